"""The operators' ``dermq`` command (click), one module per command group.

    dermq db create | upgrade | roles --owner ROLE --runtime ROLE | grant --runtime ROLE
                                                                cli.db (Alembic wiring included)
    dermq keys init [--file PATH] | rotate [--batch N] | rewrap [--batch N] | status [--json]
    dermq keys retire KEK_ID | periods [--json] | destroy-period PERIOD [--force] [--yes]
                                                                cli.encryption_keys
    dermq clinic create NAME [--json] | list [--json] | deactivate CLINIC | activate CLINIC
                                                                cli.clinics
    dermq key create [--clinic CLINIC] [--role clinic|auditor|admin] [--label TEXT] [--json]
    dermq key list [--clinic CLINIC] [--json] | revoke ID_OR_PREFIX
                                                                cli.api_keys
    dermq audit verify [--against FILE] [--all] [--json] | checkpoint [--json]
                                                                cli.audit
    dermq model list [--json] | verify [MODEL]                  cli.models (loads ml inside the command)
    dermq drift report [--day YYYY-MM-DD] [--json]              cli.drift (loads ml inside the command)
    dermq monitor report [--model ID] [--months N] [--mel-floor X] [--min-melanomas N] [--json]
                                                                cli.monitor (loads ml inside the command)
    dermq demo [--clinic NAME] [--key-file PATH]                cli.demo (core.demo does the work)

A CLINIC is a clinic's name or id. cli.common holds what the groups share (the audit actor,
``--json``). cli.main assembles the groups and turns errors into exit codes: 0 done, 1 the check
found a problem (a broken audit chain, no checkpoint yet, a failed model, drift, a melanoma
sensitivity alert, a key the data needs missing, data keys left to re-wrap), 2 bad input (usage, an
unknown clinic or key, a bad key file, an invalid setting), 69 the database cannot be reached. The
cli package may import api, core, worker and ml; none of them imports it. Every change made here is
audited with the actor ``cli``.
"""
