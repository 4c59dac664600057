"""A hospital gone wrong, for the fault-tolerance runs of the real simulator (tests/test_faults.py).

The job names this class instead of FedXViTExecutor; sites not listed in `faults` behave exactly
like the real executor. Faults: "nan" (every update is NaN), "scale:<factor>" (every update
multiplied, e.g. scale:1e6), "raise_in_round_<r>" (the train task raises in round r).
"""

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.app_constant import AppConstants

from fedxvit.executor import FedXViTExecutor


class FaultyExecutor(FedXViTExecutor):
    def __init__(self, faults: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.faults = dict(faults or {})

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        fault = self.faults.get(fl_ctx.get_identity_name())
        is_train = task_name == self.task_names["train"]
        if is_train and fault == f"raise_in_round_{shareable.get_header(AppConstants.CURRENT_ROUND)}":
            raise RuntimeError(f"injected failure: {fault}")
        result = super().execute(task_name, shareable, fl_ctx, abort_signal)
        if not is_train or fault is None or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return result
        dxo = from_shareable(result)
        if fault == "nan":
            dxo.data = {name: np.full_like(value, np.nan) for name, value in dxo.data.items()}
        elif fault.startswith("scale:"):
            dxo.data = {name: value * np.float32(fault.split(":")[1]) for name, value in dxo.data.items()}
        return dxo.to_shareable()
