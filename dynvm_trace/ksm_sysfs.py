"""/sys/kernel/mm/ksm of a stock kernel: the files, their parsers and the reader.

Older kernels lack many of these files; a missing one is simply left out.
"""

from __future__ import annotations

from .paths import Roots
from .pone_sysfs import parse_value

# Tunables (writable) and counters (read-only), as in Linux 6.x.
KSM_TUNABLE_FILES = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing",
                     "merge_across_nodes", "use_zero_pages", "smart_scan",
                     "stable_node_chains_prune_millisecs", "advisor_mode", "advisor_max_cpu",
                     "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
                     "advisor_target_scan_time")
KSM_COUNTER_FILES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                     "pages_skipped", "full_scans", "pages_scanned", "general_profit",
                     "ksm_zero_pages", "stable_node_chains", "stable_node_dups")
KSM_FILES = KSM_TUNABLE_FILES + KSM_COUNTER_FILES
# Files that hold a choice of words, the selected one in brackets ("[none] scan-time").
KSM_CHOICE_FILES = frozenset({"advisor_mode"})


def parse_choice(text: str) -> str:
    """A choice file's text as the kernel prints it, minus surrounding whitespace; the
    selected word is the one in brackets."""
    s = " ".join(text.split())
    if not s:
        raise ValueError("empty value")
    return s


def parse_ksm_file(name: str, text: str) -> int | str:
    """The value of /sys/kernel/mm/ksm/`name`: text for choice files, else a signed integer
    (general_profit can be negative)."""
    return parse_choice(text) if name in KSM_CHOICE_FILES else parse_value(text)


def read_ksm(roots: Roots, problems: list[str] | None = None) -> dict[str, int | str]:
    """Every known file present in /sys/kernel/mm/ksm ({} when KSM is not built in).

    Missing files are left out silently (older kernels); unreadable or garbled ones are left
    out and described in `problems` when a list is given.
    """
    values: dict[str, int | str] = {}
    for name in KSM_FILES:
        path = roots.ksm_dir / name
        try:
            values[name] = parse_ksm_file(name, path.read_text(encoding="utf-8",
                                                                errors="replace"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            if problems is not None:
                problems.append(f"{path}: {getattr(e, 'strerror', None) or e}")
    return values
