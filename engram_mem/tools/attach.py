"""attach(args): the Ray module and controller of the memory cluster a command names (--address, --name)."""

from __future__ import annotations

import sys


def attach(args):
    """(ray module, controller handle) of the named cluster; exits with a message if there is none."""
    import ray

    from engram_mem.control import local
    from engram_mem.control.controller import get_controller

    address = args.address
    if address is None:
        state = local.read_state(args.name)
        if state is None:
            sys.exit(f"engram-mem: no local memory cluster {args.name!r} is running; start one with `engram-mem up`")
        address = state["ray_address"]
    local.attach_ray(address)
    ctl = get_controller(args.name)
    if ctl is None:
        ray.shutdown()
        sys.exit(f"engram-mem: no memory cluster {args.name!r} in the Ray cluster at {address}")
    return ray, ctl
