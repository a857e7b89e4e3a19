"""Commands that look at the host as it is: doctor, status, knobs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dynvm_trace import bpf_host, capabilities, exitcodes, ksm_sysfs, pone_doctor, procfs, vms
from dynvm_trace.environment import Environment
from dynvm_trace.knobs import list_knobs, set_knob
from dynvm_trace.paths import page_size
from dynvm_trace.pone_sysfs import read_pone, read_stat_end

from .options import json_option, roots_options
from .tables import table


def _print_json(env: Environment, data) -> None:
    env.out(json.dumps(data, indent=2, sort_keys=False))


def _print_checks(env: Environment, checks: list[capabilities.Check], indent: str = "") -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        env.out(f"{indent}{'ok' if c.ok else 'no':<3} {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            env.out(f"{indent}{'':{width + 4}}  fix: {c.fix}")


@click.command()
@json_option
@click.option("--source", "for_source", type=click.Choice(["all", "pone"]), default="all",
              show_default=True, help="pone: also walk the pone installation checks and probe points")
@click.option("--system-map", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="pone: check probe points against this System.map instead of /proc/kallsyms")
@click.option("--vmlinux", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="pone: check probe points against this vmlinux (ELF symbols; with DWARF, "
                   "also functions that exist only inlined)")
@roots_options
@click.pass_obj
def doctor(env: Environment, as_json: bool, for_source: str, system_map: Path | None,
           vmlinux: Path | None) -> int:
    """What this host can trace, and for what it cannot, what is missing and the fix."""
    checks = capabilities.source_checks(env.roots)
    auto, passed_over = capabilities.auto_source(env.roots, checks)
    workload = capabilities.ksm_workload(env.roots)
    requirements = bpf_host.requirement_checks(env.roots)
    pone = (pone_doctor.doctor(env.roots, system_map=system_map, vmlinux=vmlinux)
            if for_source == "pone" or system_map or vmlinux else None)
    if as_json:
        data = {"auto": auto, "auto_passed_over": passed_over,
                "sources": [c.as_dict() for c in checks], "ksm_workload": workload.as_dict(),
                "live_tracing": [c.as_dict() for c in requirements]}
        if pone is not None:
            data["pone"] = [c.as_dict() for c in pone]
        _print_json(env, data)
        return exitcodes.OK
    _print_checks(env, checks)
    # what there is to watch decides whether auto picks ksm
    env.out("ksm to watch: " + (workload.detail if workload.ok else f"nothing ({workload.detail})"))
    env.out("live tracing needs:")
    _print_checks(env, requirements, indent="  ")
    env.out(f"--source auto picks: {auto}"
            + (f" (passed over: {'; '.join(passed_over)})" if passed_over else ""))
    if pone is not None:
        env.out("")
        env.out("pone (the Dynamic VM kernel):")
        _print_checks(env, pone)
    return exitcodes.OK


def _host_state(env: Environment, stat_end: bool) -> dict:
    roots = env.roots
    state: dict = {"page_size": page_size()}
    pone = read_pone(roots)
    if pone.dialect is not None:
        info = pone.info
        merged = info.get("slice merge cnt", 0) - info.get("delete merge page cnt", 0)
        state["pone"] = {"dialect": pone.dialect, "knobs": pone.knobs,
                         "merged_pages": merged, "released_pages": info.get("page recycle count", 0),
                         "pone_info": info, "pone_abstract": pone.abstract, "problems": pone.reasons}
        if stat_end:
            try:
                state["pone"]["pone_stat_end"] = read_stat_end(roots, state["pone"]["problems"])
            except OSError as e:
                state["pone"]["problems"].append(f"pone_stat_end: {e.strerror}")
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
@click.option("--stat-end", is_flag=True,
              help="also read pone_stat_end: counter changes since pone_stat_begin was last read")
@roots_options
@click.pass_obj
def status(env: Environment, as_json: bool, stat_end: bool) -> int:
    """Counters, knobs and the per-VM table, as the kernel shows them now."""
    state = _host_state(env, stat_end)
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
        counters = table("counter", "value")
        for label, value in {**pone["pone_info"], **pone["pone_abstract"]}.items():
            counters.add_row(label, f"{value:,}")
        out(counters)
        if "pone_stat_end" in pone:
            since = table("pone_stat_end (since pone_stat_begin)", "change")
            for label, value in pone["pone_stat_end"].items():
                since.add_row(label, f"{value:,}")
            out(since)
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
    vm_table = table("pid", "ksm merging pages", "ksm profit", text=("vm", "comm", "pone tracks it"))
    for vm in state["vms"]:
        stat = vm["ksm_stat"] or {}
        vm_table.add_row(str(vm["pid"]), vm["name"], vm["comm"], "yes" if vm["pone_tracked"] else "no",
                      f"{stat.get('ksm_merging_pages', '-')}", f"{stat.get('ksm_process_profit', '-')}")
    out(f"VMs: {len(state['vms'])}")
    if state["vms"]:
        out(vm_table)
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
    knob_table = table("interface", "value", "default", text=("knob", "range"))
    for k in found:
        knob_table.add_row(k.interface, k.name, k.range, "?" if k.value is None else str(k.value),
                           k.default_text)
    env.console.print(knob_table)
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
