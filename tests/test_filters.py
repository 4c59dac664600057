"""The server's task-result filter rejects poisoned or mismatched updates and passes good ones untouched."""

import re

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from fedxvit.filters import RejectBadUpdates, find_bad_tensor

GLOBAL = {"head.weight": np.zeros((2, 4), np.float32), "head.bias": np.zeros(2, np.float32)}


class FakeEngine:
    def fire_event(self, event_type, fl_ctx):
        pass


def server_ctx(site="site2"):
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, FakeEngine(), private=True, sticky=False)
    fl_ctx.set_peer_context(peer)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(GLOBAL, {}), private=True, sticky=False)
    return fl_ctx


def update(**changes):
    data = {"head.weight": np.full((2, 4), 0.01, np.float32), "head.bias": np.full(2, -0.02, np.float32)}
    data.update(changes)
    return DXO(DataKind.WEIGHT_DIFF, data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 3}).to_shareable()


def test_good_update_passes_unchanged():
    shareable = update()
    result = RejectBadUpdates().process(shareable, server_ctx())
    assert result is shareable
    dxo = from_shareable(result)
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 3
    assert np.array_equal(dxo.data["head.bias"], np.full(2, -0.02, np.float32))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"head.bias": np.array([np.nan, 0.0], np.float32)}, r"head.bias: holds NaN"),
        ({"head.weight": np.full((2, 4), np.inf, np.float32)}, r"head.weight: holds Inf"),
        ({"head.weight": np.zeros((4, 2), np.float32)}, r"head.weight: shape \(4, 2\) != global \(2, 4\)"),
        (
            {"blocks.9.attn.qkv.weight": np.zeros(3, np.float32)},
            r"blocks.9.attn.qkv.weight: not a tensor of the global model",
        ),
    ],
)
def test_bad_update_is_rejected_with_one_line_naming_site_and_tensor(bad, message, caplog):
    result = RejectBadUpdates().process(update(**bad), server_ctx("site2"))
    assert result.get_return_code() == ReturnCode.EXECUTION_RESULT_ERROR
    with pytest.raises(ValueError):
        from_shareable(result)  # no data left for the aggregator to take
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "site2" in errors[0]
    assert find_bad_tensor(from_shareable(update(**bad)).data, GLOBAL) is not None
    assert re.search(message, errors[0])


def test_failed_or_non_weight_results_are_left_alone():
    filt = RejectBadUpdates()
    metrics = DXO(DataKind.METRICS, {"val_accuracy": float("nan")}).to_shareable()
    assert filt.process(metrics, server_ctx()) is metrics


def test_without_a_global_model_only_finiteness_is_checked():
    assert find_bad_tensor({"x": np.ones(3)}) is None
    assert "NaN" in find_bad_tensor({"x": np.array([1.0, np.nan])})
