"""The pack's policies: every rule of `rules.py` as a mandatory `ResourceValidationPolicy`, its
settings (if any) as the policy's config schema."""

from __future__ import annotations

from pulumi_policy import EnforcementLevel, PolicyConfigSchema, ReportViolation, ResourceValidationArgs, ResourceValidationPolicy

from rules import RULES, Resource, Rule

PACK_NAME = "jetstream-tpu-guardrails"


def _validate(rule: Rule):
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        resource = Resource(type=args.resource_type, urn=args.urn, props=args.props)
        if not rule.applies(resource):
            args.not_applicable()  # raises: the engine records this policy as not judging the resource
        # The engine sends the configured values (schema defaults filled in); none without configuration.
        for message in rule.violations(resource, args.get_config()):
            report_violation(f"{args.name}: {message}", None)
    return validate


POLICIES = [
    ResourceValidationPolicy(name=rule.name, description=rule.description, validate=_validate(rule),
                             enforcement_level=EnforcementLevel.MANDATORY,
                             config_schema=PolicyConfigSchema(properties=dict(rule.config)) if rule.config else None)
    for rule in RULES
]
