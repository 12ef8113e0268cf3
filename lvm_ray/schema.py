"""The canonical ECG and the shard schema: the one place that declares them.

Every other module imports lead names, the sample rate, the waveform shape and the column
types from here; nothing re-states them.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
N_LEADS = len(LEADS)
LEAD_INDEX: dict[str, int] = {name: i for i, name in enumerate(LEADS)}
#: Leads a source must provide; the other four follow from Einthoven/Goldberger.
INDEPENDENT_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")

SAMPLE_RATE_HZ = 500
DURATION_S = 10
N_SAMPLES = SAMPLE_RATE_HZ * DURATION_S
WAVEFORM_SHAPE = (N_LEADS, N_SAMPLES)
#: int16 microvolts: +-32.767 mV, enough for any surface ECG.
INT16_MIN, INT16_MAX = -32768, 32767

WAVEFORM_TYPE = pa.fixed_shape_tensor(pa.int16(), list(WAVEFORM_SHAPE))

#: Why ingest doubts a stored record's voltages (e.g. 'amplitude-normalised: ...'); null when fine.
#: Scoring should warn on flagged records; ``ingest --strict`` quarantines them instead.
QUALITY_FLAG = "quality_flag"

#: Columns every shard has, in order. Covariates and labels are nullable.
CORE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("ecg_id", pa.string(), nullable=False),
    pa.field("patient_id", pa.string()),
    pa.field("ecg_datetime", pa.timestamp("us")),
    pa.field("source_format", pa.string()),
    pa.field("source_uri", pa.string()),
    pa.field("original_fs", pa.float64()),
    pa.field("age", pa.float64()),
    pa.field("sex", pa.string()),
    pa.field("height_cm", pa.float64()),
    pa.field("weight_kg", pa.float64()),
    pa.field("bsa_m2", pa.float64()),
    pa.field("lv_mass_g", pa.float64()),
    pa.field(QUALITY_FLAG, pa.string()),
)
WAVEFORM_FIELD = pa.field("ecg", WAVEFORM_TYPE, nullable=False)


def cart_column(kind: str, lead: str) -> str:
    """Column holding the ECG cart's own amplitude, e.g. cart_r_uv_V5 (kind 'r' or 's')."""
    return f"cart_{kind}_uv_{lead}"


def true_column(kind: str, lead: str) -> str:
    """Synthetic-cohort column holding the generator's true amplitude, e.g. true_s_uv_V1."""
    return f"true_{kind}_uv_{lead}"


#: The cart's per-lead R and S amplitudes (CardioSoft / MUSE), null where the source has none.
CART_FIELDS: tuple[pa.Field, ...] = tuple(
    pa.field(cart_column(kind, lead), pa.float64()) for kind in ("r", "s") for lead in LEADS
)
TRUE_AMPLITUDE_FIELDS: tuple[pa.Field, ...] = tuple(
    pa.field(true_column(kind, lead), pa.float64()) for kind in ("r", "s") for lead in LEADS
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("ecg_id", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("source_format", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def shard_schema(extra_fields: list[pa.Field] | tuple[pa.Field, ...] = ()) -> pa.Schema:
    """The shard schema: core columns, cart amplitudes, any extra columns, then the waveform."""
    core_names = {f.name for f in CORE_FIELDS} | {f.name for f in CART_FIELDS} | {"ecg"}
    extras = [f for f in extra_fields if f.name not in core_names]
    return pa.schema(
        [*CORE_FIELDS, *CART_FIELDS, *extras, WAVEFORM_FIELD],
        metadata={b"lvm_ray.schema_version": str(SCHEMA_VERSION).encode()},
    )
