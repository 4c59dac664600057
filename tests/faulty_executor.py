"""A hospital gone wrong, for the fault-tolerance runs of the real simulator (tests/test_faults.py).

The job names this class instead of FedXViTExecutor; sites not listed in `faults` behave exactly
like the real executor. Faults: "nan" (every update is NaN), "scale:<factor>" (every update
multiplied, e.g. scale:1e6), "raise_in_round_<r>" (the train task raises in round r),
"overclaim:<steps>" (the update turned round, same size, claiming that many steps: a site buying the
average), "hang_in_round_<r>" (takes the train task of round r and answers nothing for an hour, or
until the run is aborted: a hung site; it takes no other task, submit_model and validate included).
"""

import time

import numpy as np
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import make_reply
from nvflare.app_common.app_constant import AppConstants

from fedxvit.executor import FedXViTExecutor

HANG_S = 3600


class FaultyExecutor(FedXViTExecutor):
    def __init__(self, faults: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.faults = dict(faults or {})

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        fault = self.faults.get(fl_ctx.get_identity_name())
        is_train = task_name == self.task_names["train"]
        this_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        if is_train and fault == f"raise_in_round_{this_round}":
            raise RuntimeError(f"injected failure: {fault}")
        if is_train and fault == f"hang_in_round_{this_round}":
            until = time.monotonic() + HANG_S
            while time.monotonic() < until and not abort_signal.triggered:
                time.sleep(0.2)
            return make_reply(ReturnCode.TASK_ABORTED)
        result = super().execute(task_name, shareable, fl_ctx, abort_signal)
        if not is_train or fault is None or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return result
        dxo = from_shareable(result)
        if fault == "nan":
            dxo.data = {name: np.full_like(value, np.nan) for name, value in dxo.data.items()}
        elif fault.startswith("scale:"):
            dxo.data = {name: value * np.float32(fault.split(":")[1]) for name, value in dxo.data.items()}
        elif fault.startswith("overclaim:"):
            dxo.data = {name: -value for name, value in dxo.data.items()}
            dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, int(float(fault.split(":")[1])))
        return dxo.to_shareable()
