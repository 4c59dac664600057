"""A site's half of the trainable-only downlink (the server's half is fedxvit.downlink): the site keeps the frozen
tensors of the last whole model it received, publishes their fingerprint, and fills them back into a task whose
model left them out."""

from __future__ import annotations

from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedxvit.errors import FedXViTError
from fedxvit.protocol import FROZEN_META, HELD_PROP, fingerprint, in_clear, model_part


class FrozenTensors:
    """A site's half: the frozen tensors of the last whole model it received (never trained, never sent), so that
    the server may leave them out of the next tasks."""

    def __init__(self, site: str, trainable):
        self.site = site
        self.trainable = sorted(trainable)
        self.arrays: dict = {}
        self.fingerprint: str | None = None

    def receive(self, shareable: Shareable, fl_ctx: FLContext) -> None:
        """Complete the task's model in place, or keep the frozen tensors of a whole one; FedXViTError (one line)
        when the server left out tensors this site does not hold."""
        try:
            weights = model_part(from_shareable(shareable))
        except ValueError:
            return
        if weights is None:
            return
        expected = (weights.meta or {}).get(FROZEN_META)
        if expected is None:
            self._keep(weights.data, fl_ctx)
            return
        if expected != self.fingerprint:
            held = self.fingerprint
            self.forget(fl_ctx)
            raise FedXViTError(
                f"site {self.site}: the server left out the frozen tensors {expected[:12]}, but this site holds "
                f"{held[:12] if held else 'none'}: task refused; the next task brings the whole model"
            )
        weights.data.update({name: value for name, value in self.arrays.items() if name not in weights.data})

    def _keep(self, weights: dict, fl_ctx: FLContext) -> None:
        trainable = set(self.trainable)
        frozen = {name: value for name, value in weights.items() if name not in trainable}
        if not frozen or not in_clear(frozen):
            return
        self.arrays, self.fingerprint = frozen, fingerprint(frozen)
        held = {"trainable": self.trainable, "fingerprint": self.fingerprint}
        fl_ctx.set_prop(HELD_PROP, held, private=False, sticky=True)

    def forget(self, fl_ctx: FLContext) -> None:
        self.arrays, self.fingerprint = {}, None
        fl_ctx.set_prop(HELD_PROP, None, private=False, sticky=True)
