"""Run the hospital executor without an NVFlare server: a client workspace and an FLContext.

For the unit tests and the benchmarks, which call `FedXViTExecutor.execute` directly and
measure exactly what NVFlare would serialize and send (`serialized_size`).
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace


class StandaloneEngine:
    """Just what the executor touches: the workspace, event firing and (absent) components."""

    def __init__(self, workspace: Workspace, components: dict | None = None):
        self.workspace = workspace
        self.components = components or {}

    def get_workspace(self):
        return self.workspace

    def fire_event(self, event_type, fl_ctx):
        pass

    def get_component(self, component_id):
        return self.components.get(component_id)


def make_fl_ctx(client_root: Path, site: str = "site1", job_id: str = "job1") -> FLContext:
    """An FLContext for `site` whose client workspace is `client_root` (created as NVFlare lays it out)."""
    client_root = Path(client_root)
    for folder in ("startup", "local"):  # what NVFlare checks a workspace has
        (client_root / folder).mkdir(parents=True, exist_ok=True)
    workspace = Workspace(root_dir=str(client_root), site_name=site)
    app_dir = Path(workspace.get_app_dir(job_id))
    app_dir.mkdir(parents=True, exist_ok=True)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, StandaloneEngine(workspace), private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=False)
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app_dir), private=True, sticky=False)
    return fl_ctx


def serialized_size(shareable) -> int:
    """Bytes of a Shareable as NVFlare's FOBS serializes it for the wire (DXO, numpy decomposers)."""
    from nvflare.apis.utils.decomposers import flare_decomposers
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.fuel.utils import fobs

    flare_decomposers.register()
    common_decomposers.register()
    return len(fobs.dumps(shareable))
