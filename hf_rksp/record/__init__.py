"""The audit record: typed parts of ``audit.json``, its JSON schema and reader, and the model-level summary.

Depends on the spectral core's feature registry only.
"""

from hf_rksp.record.records import (
                                    SCHEMA_VERSION,
                                    Aggregate,
                                    AuditRecord,
                                    BlockRecord,
                                    EnvironmentRecord,
                                    InputsRecord,
                                    MethodRecord,
                                    MonitorAlarm,
                                    PreflightResult,
                                    RiskEntry,
                                    RouterStats,
                                    SourceRecord,
                                    SummaryRecord,
                                    audit_schema,
                                    read_audit,
                                    validate_audit,
)

__all__ = ["SCHEMA_VERSION", "Aggregate", "AuditRecord", "BlockRecord", "EnvironmentRecord", "InputsRecord",
           "MethodRecord", "MonitorAlarm", "PreflightResult", "RiskEntry", "RouterStats", "SourceRecord", "SummaryRecord", "audit_schema", "read_audit",
           "validate_audit"]
