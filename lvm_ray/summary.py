"""A person-readable summary of a dataset: counts, quarantine reasons, LV mass and LVH prevalence."""

from __future__ import annotations

from typing import Any

from lvm_ray import store
from lvm_ray.lvh import LVHConfig, derive

_SUMMARY_COLUMNS = ("ecg_id", "sex", "age", "bsa_m2", "lv_mass_g", "source_format")


def dataset_summary(root: str, lvh_config: LVHConfig = LVHConfig()) -> dict[str, Any]:
    """Summarise a dataset from its manifest and metadata columns (never the waveforms)."""
    manifest = store.read_manifest(root)
    table = store.read_table(root, columns=_SUMMARY_COLUMNS).to_pandas()
    summary: dict[str, Any] = {
        "root": root,
        "n_stored": manifest["n_rows"],
        "n_quarantined": manifest["n_quarantined"],
        "quarantine_by_reason": manifest.get("quarantine_by_reason", {}),
        "by_format": {str(k): int(v) for k, v in table["source_format"].value_counts().items()},
        "sex": {str(k): int(v) for k, v in table["sex"].value_counts().items()},
    }
    mass = table["lv_mass_g"].astype(float)
    if mass.notna().any():
        summary["lv_mass_g"] = {
            "n": int(mass.notna().sum()),
            "mean": float(mass.mean()),
            "sd": float(mass.std()),
            "p5": float(mass.quantile(0.05)),
            "p50": float(mass.median()),
            "p95": float(mass.quantile(0.95)),
        }
        for sex in ("M", "F"):
            sub = mass[table["sex"] == sex]
            if sub.notna().any():
                summary["lv_mass_g"][f"mean_{sex}"] = float(sub.mean())
        lvh = derive(table, lvh_config)["lvh"].reset_index(drop=True)
        if lvh.notna().any():
            summary["lvh_prevalence"] = float(lvh.dropna().astype(bool).mean())
            summary["lvh_prevalence_by_sex"] = {
                sex: float(lvh[(table["sex"] == sex).to_numpy()].dropna().astype(bool).mean())
                for sex in ("M", "F")
                if lvh[(table["sex"] == sex).to_numpy()].notna().any()
            }
    return summary


def format_dataset_summary(summary: dict[str, Any]) -> str:
    lines = [f"dataset {summary['root']}", f"  stored ECGs      {summary['n_stored']:>8d}"]
    lines.append(f"  quarantined      {summary['n_quarantined']:>8d}")
    for reason, count in summary["quarantine_by_reason"].items():
        lines.append(f"    {reason:<22s}{count:>6d}")
    if summary["by_format"]:
        lines.append("  formats          " + ", ".join(f"{k}: {v}" for k, v in summary["by_format"].items()))
    if summary["sex"]:
        lines.append("  sex              " + ", ".join(f"{k}: {v}" for k, v in summary["sex"].items()))
    if "lv_mass_g" in summary:
        m = summary["lv_mass_g"]
        lines.append(
            f"  LV mass (g)      mean {m['mean']:.1f} sd {m['sd']:.1f}  p5 {m['p5']:.0f} p50 {m['p50']:.0f} "
            f"p95 {m['p95']:.0f}  (n={m['n']})"
        )
        by_sex = "  ".join(f"{s}: {m[f'mean_{s}']:.1f}" for s in ("M", "F") if f"mean_{s}" in m)
        if by_sex:
            lines.append(f"  LV mass by sex   {by_sex}")
    if "lvh_prevalence" in summary:
        by_sex = ", ".join(f"{k} {v:.1%}" for k, v in summary["lvh_prevalence_by_sex"].items())
        lines.append(f"  CMR LVH          {summary['lvh_prevalence']:.1%}  ({by_sex})")
    return "\n".join(lines)
