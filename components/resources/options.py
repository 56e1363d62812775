"""Resource options the components share."""

from __future__ import annotations

import pulumi


def component_dependencies(opts: pulumi.ResourceOptions | None) -> list:
    """What a component was given in `opts.depends_on`, as a list (empty if nothing)."""
    depends_on = opts.depends_on if opts else None
    if depends_on is None:
        return []
    return list(depends_on) if isinstance(depends_on, (list, tuple)) else [depends_on]


def child_after(parent: pulumi.Resource, opts: pulumi.ResourceOptions | None) -> pulumi.ResourceOptions:
    """Options of a child that waits for the component's own `depends_on`: recorded on the child
    itself, so the engine orders the child's create (and delete) by them."""
    return pulumi.ResourceOptions(parent=parent, depends_on=component_dependencies(opts))
