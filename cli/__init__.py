"""The operators' ``dermq`` command (click), one module per command group.

    dermq db create | upgrade                                   cli.db (Alembic wiring included)
    dermq keys init [--file PATH] | rotate | rewrap | status | retire KEK_ID
                                                                cli.encryption_keys
    dermq clinic create NAME | list | deactivate NAME | activate NAME
                                                                cli.clinics
    dermq key create --clinic NAME --role clinic|auditor|admin [--label TEXT] [--json]
    dermq key list [--clinic NAME] | revoke ID                  cli.api_keys
    dermq audit verify [--json]                                 cli.audit
    dermq model list [--json] | verify [MODEL]                  cli.models (loads ml inside the command)
    dermq drift report [--day YYYY-MM-DD] [--json]              cli.drift (loads ml inside the command)
    dermq demo [--clinic NAME] [--key-file PATH]                cli.demo (core.demo does the work)

cli.main assembles the groups and turns errors into exit codes: 0 done, 1 the check found a problem
(a broken audit chain, a failed model, drift, data keys left to re-wrap), 2 bad input (usage, an
unknown clinic or key, a bad key file). The cli package may import api, core, worker
and ml; none of them imports it. Every change made here is audited with the actor ``cli``.
"""
