"""The printed table of a benchmark run (from the same dict that `--json` writes)."""

from __future__ import annotations

from typing import Any

UIDL = "uidl100k"
JMAP = "gateway-jmap"
ISSUE_COUNT = 100_000  # issue 4's targets are for a mailbox of this many messages


def format_table(results: dict[str, Any]) -> str:
    targets = results["targets"]
    width = max(16, *(len(t) + 2 for t in targets))
    lines = [
        "",
        f"pop3-gateway benchmark: {results['repeat']} repetitions per target, {results['client']} client, "
        f"targets interleaved, {results['machine']['cpus']} CPUs; gateway at {results['git']}",
        "upstreams: Dovecot 2.3 IMAP/Maildir (dovecot-direct, imapc-peer, gateway)" + _jmap_upstream(results),
        "",
        f"{'workload':<10}{'target':<{width}}{'median s':>10}{'min s':>9}{'max s':>9}{'client CPU':>12}"
        f"{'gateway CPU':>13}",
    ]
    for name, w in results["workloads"].items():
        if name == UIDL:
            lines += _uidl_rows(w, width)
            continue
        lines.append(
            f"{name:<10}{w['description']}  (identical bytes from all targets: {w['retr_octets']} octets)"
        )
        lines += _target_rows(w, width)
        lines += _ratio_rows(w)
        lines.append(f"{'':<10}(imapc-peer/dovecot-direct {w['ratio_imapc_peer_to_dovecot_direct']:.2f}x)")
        lines += [f"{'':<10}{line}" for note in w["notes"] for line in _wrap(f"({note})", 100)]
        lines.append("")
    for label, g in results["gateways"].items():
        what = ", ".join(g["workloads"])
        if label.endswith("@" + UIDL):
            after_first = g.get("peak_rss_kib_after_first_login")
            lines.append(
                f"{label} peak RSS (VmHWM): {g['peak_rss_kib'] / 1024:.1f} MiB after all {UIDL} sessions, "
                + (f"{after_first / 1024:.1f} MiB after the first login " if after_first else "")
                + f"(VmRSS at the end {g['rss_kib'] / 1024:.1f} MiB, "
                f"CPU {g['cpu_seconds_total']:.1f} s in all; its own process: {UIDL} only)"
            )
        else:
            lines.append(
                f"{label} peak RSS (VmHWM): {g['peak_rss_kib'] / 1024:.1f} MiB   "
                f"(VmRSS at the end {g['rss_kib'] / 1024:.1f} MiB, "
                f"CPU {g['cpu_seconds_total']:.1f} s in all; {what})"
            )
    lines.append(
        "client CPU = the benchmark client's own CPU per session; gateway CPU = the gateway process's CPU "
        "per session (medians)"
    )
    return "\n".join(lines)


def _jmap_upstream(results: dict[str, Any]) -> str:
    up = results.get("jmap_upstream")
    if up is None:
        return ""
    return f"; Cyrus 3.6 JMAP, jmap_max_objects_in_get {up['jmap_max_objects_in_get']} ({JMAP})"


def _target_rows(w: dict[str, Any], width: int) -> list[str]:
    lines = []
    for t, r in w["targets"].items():
        gw = f"{r['gateway_cpu_median_s']:.3f}" if "gateway_cpu_median_s" in r else ""
        lines.append(
            f"{'':<10}{t:<{width}}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['max_s']:>9.3f}"
            f"{r['client_cpu_median_s']:>12.3f}{gw:>13}"
        )
    return lines


def _ratio_rows(w: dict[str, Any], key: str = "ratios") -> list[str]:
    lines = []
    for t, ratio in w[key].items():
        line = (
            f"{'':<10}{t}/imapc-peer {ratio['to_imapc_peer']:.2f}x   "
            f"{t}/dovecot-direct {ratio['to_dovecot_direct']:.2f}x"
        )
        if "to_gateway" in ratio:
            line += f"   {t}/gateway {ratio['to_gateway']:.2f}x"
        lines.append(line)
    return lines


def _uidl_rows(w: dict[str, Any], width: int) -> list[str]:
    n = w["messages"]
    lines = [
        f"{UIDL:<10}{w['description']}  "
        f"(identical UIDL listings from all targets: {w['listing_lines']} lines)",
        f"{'':<10}first login (the gateway assigns and stores {n} UIDLs; the peers build their indexes):",
    ]
    for t, r in w["first_login"].items():
        gw = f"{r['gateway_cpu_s']:.3f}" if "gateway_cpu_s" in r else ""
        lines.append(
            f"{'':<10}{t:<{width}}{r['seconds']:>10.3f}{'':>9}{'':>9}{r['client_cpu_s']:>12.3f}{gw:>13}"
        )
    lines += _ratio_rows(w, "first_login_ratios")
    lines.append(f"{'':<10}steady state ({w['steady_state']}):")
    lines += _target_rows(w, width)
    lines += _ratio_rows(w)
    lines.append(f"{'':<10}(imapc-peer/dovecot-direct {w['ratio_imapc_peer_to_dovecot_direct']:.2f}x)")
    scope = "" if n == ISSUE_COUNT else f" (the issue sets them for {ISSUE_COUNT} messages)"
    for t, goal in w["goals"].items():
        ratio_ok = goal["ratio_to_imapc_peer"] <= goal["max_ratio_to_imapc_peer"]
        time_ok = goal["median_s"] < goal["max_seconds"]
        lines.append(
            f"{'':<10}issue 4 targets for {t} (steady state): "
            f"<= {goal['max_ratio_to_imapc_peer']:.2f}x imapc-peer: {goal['ratio_to_imapc_peer']:.2f}x "
            f"{'MET' if ratio_ok else 'MISSED'};  "
            f"< {goal['max_seconds']:.1f} s: {goal['median_s']:.3f} s {'MET' if time_ok else 'MISSED'}{scope}"
        )
    lines.append("")
    return lines


def _wrap(text: str, width: int) -> list[str]:
    out: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(line)
    return out
