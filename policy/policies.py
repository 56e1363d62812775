"""The pack's policies: every rule of `rules.py` as a mandatory `ResourceValidationPolicy`, its
settings (if any) as the policy's config schema; every stack rule as an advisory `StackValidationPolicy`."""

from __future__ import annotations

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from rules import RULES, STACK_RULES, Resource, Rule, StackRule

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


def _validate_stack(rule: StackRule):
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        resources = [
            Resource(type=resource.resource_type, urn=resource.urn, props=resource.props) for resource in args.resources
        ]
        if not rule.applies(resources):
            args.not_applicable()  # raises: nothing in this stack for the rule to judge
        for urn, message in rule.check(resources):
            report_violation(message, urn)

    return validate


POLICIES = [
    *(
        ResourceValidationPolicy(
            name=rule.name,
            description=rule.description,
            validate=_validate(rule),
            enforcement_level=EnforcementLevel.MANDATORY,
            config_schema=PolicyConfigSchema(properties=dict(rule.config)) if rule.config else None,
        )
        for rule in RULES
    ),
    *(
        StackValidationPolicy(
            name=rule.name,
            description=rule.description,
            validate=_validate_stack(rule),
            enforcement_level=EnforcementLevel.ADVISORY,
        )
        for rule in STACK_RULES
    ),
]
