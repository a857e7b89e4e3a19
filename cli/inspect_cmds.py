"""Commands that look at the host as it is: doctor, status, knobs."""

from __future__ import annotations

import json

import click
from rich.table import Table

from dynvm_trace import bpf_host, capabilities, exitcodes, ksm_sysfs, procfs, vms
from dynvm_trace.environment import Environment
from dynvm_trace.knobs import list_knobs, set_knob
from dynvm_trace.paths import page_size
from dynvm_trace.pone_sysfs import read_pone

from .options import json_option, roots_options


def _print_json(env: Environment, data) -> None:
    env.out(json.dumps(data, indent=2, sort_keys=False))


@click.command()
@json_option
@roots_options
@click.pass_obj
def doctor(env: Environment, as_json: bool) -> int:
    """What this host can trace, and for what it cannot, what is missing and the fix."""
    checks = capabilities.source_checks(env.roots)
    auto, passed_over = capabilities.auto_source(env.roots, checks)
    workload = capabilities.ksm_workload(env.roots)
    requirements = bpf_host.requirement_checks(env.roots)
    if as_json:
        _print_json(env, {"auto": auto, "auto_passed_over": passed_over,
                          "sources": [c.as_dict() for c in checks],
                          "ksm_workload": workload.as_dict(),
                          "live_tracing": [c.as_dict() for c in requirements]})
        return exitcodes.OK
    for c in checks:
        env.out(f"{'ok' if c.ok else 'no':<3} {c.name:<8} {c.detail}")
        if not c.ok and c.fix:
            env.out(f"{'':12} fix: {c.fix}")
        if c.name == "ksm":  # what there is to watch decides whether auto picks ksm
            env.out(f"{'':12} to watch: " + (workload.detail if workload.ok
                                                   else f"nothing ({workload.detail})"))
    env.out("live tracing needs:")
    for c in requirements:
        env.out(f"  {'ok' if c.ok else 'no':<3} {c.name}: {c.detail}")
        if not c.ok and c.fix:
            env.out(f"  {'':4}fix: {c.fix}")
    env.out(f"--source auto picks: {auto}"
            + (f" (passed over: {'; '.join(passed_over)})" if passed_over else ""))
    return exitcodes.OK


def _host_state(env: Environment) -> dict:
    roots = env.roots
    state: dict = {"page_size": page_size()}
    pone = read_pone(roots)
    if pone.dialect is not None:
        info = pone.info
        merged = info.get("slice merge cnt", 0) - info.get("delete merge page cnt", 0)
        state["pone"] = {"dialect": pone.dialect, "knobs": pone.knobs,
                         "merged_pages": merged, "released_pages": info.get("page recycle count", 0),
                         "pone_info": info, "pone_abstract": pone.abstract, "problems": pone.reasons}
    if roots.ksm_dir.is_dir():
        problems: list[str] = []
        state["ksm"] = {"values": ksm_sysfs.read_ksm(roots, problems), "problems": problems}
    try:
        vmstat = procfs.read_vmstat(roots)
        state["vmstat"] = {k: vmstat[k] for k in ("cow_ksm", "ksm_swpin_copy") if k in vmstat}
    except OSError as e:
        state["vmstat_problem"] = f"{roots.procfs('vmstat')}: {e.strerror}"
    found = vms.discover(roots)
    stats = vms.ksm_stats(roots, found)
    state["vms"] = [{"pid": vm.pid, "name": vm.name, "comm": vm.comm,
                     "pone_tracked": vm.comm == vms.PONE_COMM, "ksm_stat": stats.get(vm.pid)}
                    for vm in found]
    return state


def _mib(pages: int, size: int) -> str:
    return f"{pages * size / 2**20:,.1f} MiB"


@click.command()
@json_option
@roots_options
@click.pass_obj
def status(env: Environment, as_json: bool) -> int:
    """Counters, knobs and the per-VM table, as the kernel shows them now."""
    state = _host_state(env)
    if as_json:
        _print_json(env, state)
        return exitcodes.OK
    size = state["page_size"]
    out = env.console.print
    if "pone" in state:
        pone = state["pone"]
        out(f"pone ({pone['dialect']} dialect, {env.roots.pone_dir})")
        out(f"  merged pages now   {pone['merged_pages']:>14,}  ({_mib(pone['merged_pages'], size)} saved)")
        out(f"  released pages now {pone['released_pages']:>14,}  ({_mib(pone['released_pages'], size)})")
        out("  knobs: " + ", ".join(f"{k}={v}" for k, v in pone["knobs"].items()))
        table = Table("counter", "value", title=None, box=None, pad_edge=False)
        for label, value in {**pone["pone_info"], **pone["pone_abstract"]}.items():
            table.add_row(label, f"{value:,}")
        out(table)
        for p in pone["problems"]:
            env.warn(p)
    else:
        out(f"pone: not present ({env.roots.pone_dir} not found)")
    if "ksm" in state:
        values = state["ksm"]["values"]
        out(f"ksm ({env.roots.ksm_dir}): " + ", ".join(f"{k}={v}" for k, v in values.items()))
    else:
        out(f"ksm: not present ({env.roots.ksm_dir} not found)")
    if "vmstat" in state:
        out("vmstat: " + (", ".join(f"{k}={v:,}" for k, v in state["vmstat"].items()) or "no KSM counters"))
    table = Table("pid", "vm", "comm", "pone tracks it", "ksm merging pages", "ksm profit", box=None)
    for vm in state["vms"]:
        stat = vm["ksm_stat"] or {}
        table.add_row(str(vm["pid"]), vm["name"], vm["comm"], "yes" if vm["pone_tracked"] else "no",
                      f"{stat.get('ksm_merging_pages', '-')}", f"{stat.get('ksm_process_profit', '-')}")
    out(f"VMs: {len(state['vms'])}")
    if state["vms"]:
        out(table)
    return exitcodes.OK


@click.group(invoke_without_command=True)
@json_option
@roots_options
@click.pass_context
def knobs(ctx: click.Context, as_json: bool) -> int | None:
    """List the tunables (value, default, range); `knobs set NAME VALUE` changes one."""
    if ctx.invoked_subcommand is not None:
        return None
    env: Environment = ctx.obj
    found = list_knobs(env.roots)
    if as_json:
        _print_json(env, [{"interface": k.interface, "name": k.name, "value": k.value,
                           "default": k.default, "range": k.range, "problem": k.reason} for k in found])
        return exitcodes.OK
    if not found:
        env.out(f"no tunables: neither {env.roots.pone_dir} nor {env.roots.ksm_dir} exists")
        return exitcodes.MISSING_FEATURE
    table = Table("interface", "knob", "value", "default", "range", box=None, pad_edge=False)
    for k in found:
        table.add_row(k.interface, k.name, "?" if k.value is None else str(k.value), k.default_text, k.range)
    env.console.print(table)
    for k in found:
        if k.reason:
            env.warn(k.reason)
    return exitcodes.OK


@knobs.command("set")
@click.argument("name")
@click.argument("value")
@roots_options
@click.pass_obj
def knobs_set(env: Environment, name: str, value: str) -> int:
    """Validate VALUE, write it to NAME, and read it back."""
    result = set_knob(env.roots, name, value)
    (env.out if result.taken else env.error)(result.message)
    return result.exit_code
