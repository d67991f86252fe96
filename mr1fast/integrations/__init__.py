"""Drop-ins of mr1fast's fused loss in other trainers.

Each submodule imports the trainer library it serves; this package imports nothing, so
`import mr1fast` never pulls a trainer library in.

    mr1fast.integrations.trl   TRL 1.16's GRPOTrainer: MR1GRPOTrainer, patch,
                               BetaScheduleCallback
"""
