"""The install pipeline: what gets served, every refusal, rollback, GC, and boot recovery."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from edgekit.agent import Agent, AgentConfig
from edgekit.bundle import create_bundle, inspect_bundle, read_bundle
from edgekit.data import load_data
from edgekit.errors import BundleError, HealthCheckError, InstallError, UntrustedKeyError
from edgekit.keys import init_key, list_keys, load_own_public_key, load_signing_key
from edgekit.runtime import Model, dequantize, quantize
from edgekit.tflite import inspect_tflite
from edgekit.trust import TrustedKeys


def events(agent: Agent) -> list[dict]:
    return agent.events.peek()


def bare_outputs(model_path: Path, x: np.ndarray) -> np.ndarray:
    """What the model gives for real-valued ``x`` run by hand on a bare interpreter."""
    model = Model(model_path.read_bytes(), threads=1)
    info = inspect_tflite(model_path.read_bytes())
    (spec,), (out,) = info.inputs, info.outputs
    return dequantize(model.run([quantize(x.reshape(spec.shape), spec)])[0], out)


@pytest.fixture
def agent(config_path: Path):
    a = Agent.from_config(config_path, background=False)
    yield a
    a.close()


def test_a_fresh_device_serves_nothing_and_says_how_to_fix_it(agent):
    assert not agent.status().serving
    with pytest.raises(InstallError, match="edgekit-agent install"):
        agent.predict(np.zeros((1, 8, 8, 1), np.float32))


def test_installed_fp32_bundle_predicts_exactly_like_the_bare_interpreter(agent, bundles, models):
    result = agent.install(bundles.v1)
    assert (result.version, result.changed, result.previous) == ("1.0.0", True, None)
    for x in models.x_test[:20]:
        (out,) = agent.predict(x)  # per-sample shape, batch axis added
        np.testing.assert_array_equal(out, bare_outputs(models.fp32, x))
        assert out.shape == (1, 10)
    named = agent.predict(models.x_test[0][None], as_dict=True)
    (name,) = named
    assert name == agent.status().outputs[0]["name"]
    np.testing.assert_array_equal(named[name], bare_outputs(models.fp32, models.x_test[0]))
    assert [e["kind"] for e in events(agent)] == ["installed"]


def test_without_xnnpack_the_built_in_kernels_serve_the_same_predictions(config_path, bundles, models):
    """xnnpack=False: no XNNPACK delegate in the interpreter (nothing packed at load), the health
    check passes on the built-in kernels, and predictions match the XNNPACK agent's."""
    outputs = {}
    for xnnpack in (True, False):
        with Agent.from_config(config_path, background=False, xnnpack=xnnpack) as agent:
            agent.install(bundles.v1, allow_downgrade=True)
            assert agent.status().xnnpack is xnnpack
            served = agent.served_bundle()
            assert served is not None
            ops = {op["op_name"] for op in served.model.interpreter._get_ops_details()}
            assert ("DELEGATE" in ops) is xnnpack, ops
            outputs[xnnpack] = np.concatenate([agent.predict(x)[0] for x in models.x_test[:32]])
    np.testing.assert_allclose(outputs[False], outputs[True], rtol=1e-4, atol=1e-5)


def test_int8_model_takes_floats_and_returns_dequantized_scores_unless_raw(agent, bundles, models):
    agent.install(bundles.v2)
    info = inspect_tflite(models.int8.read_bytes())
    (spec,), (out_spec,) = info.inputs, info.outputs
    x = models.x_test[3]
    (scores,) = agent.predict(x)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, bare_outputs(models.int8, x))
    (raw,) = agent.predict(quantize(x[None], spec), raw=True)
    assert raw.dtype == np.int8
    np.testing.assert_allclose(dequantize(raw, out_spec), scores)
    accuracy = np.mean(
        [int(np.argmax(agent.predict(s)[0])) == int(t) for s, t in zip(models.x_test, models.y_test)]
    )
    assert accuracy > 0.8


def test_bad_input_is_a_typed_error_and_counted(agent, bundles):
    from edgekit.errors import DataError

    agent.install(bundles.v1)
    with pytest.raises(DataError, match=r"shape \[1, 8, 8, 1\]"):
        agent.predict(np.zeros((3, 3), np.float32))
    record = agent.flush_telemetry()
    assert record is not None and record.errors == 1 and record.count == 0


@pytest.mark.parametrize(
    ("which", "error", "kind"),
    [
        ("untrusted", UntrustedKeyError, "install_refused"),
        ("tampered", BundleError, "install_refused"),
        ("unhealthy", HealthCheckError, "healthcheck_failed"),
        ("v1_again_lower", InstallError, "install_refused"),
    ],
)
def test_every_refusal_keeps_the_old_model_serving_and_records_an_event(
    agent, bundles, models, which, error, kind
):
    agent.install(bundles.v1)
    agent.install(bundles.v2)
    before = agent.predict(models.x_test[0])
    target = bundles.v1 if which == "v1_again_lower" else getattr(bundles, which)
    with pytest.raises(error):
        agent.install(target)
    status = agent.status()
    assert status.version == "2.0.0"
    np.testing.assert_array_equal(agent.predict(models.x_test[0])[0], before[0])
    last = events(agent)[-1]
    assert last["kind"] == kind and last["message"]
    # Nothing of the refused bundle is left on disk; the previous bundle is kept for rollback.
    dirs = sorted(p.name for p in agent.store.bundles.iterdir())
    assert len(dirs) == 2 and all(d.startswith(("digits-1.0.0-", "digits-2.0.0-")) for d in dirs)
    # A fresh agent (a reboot) serves the same model.
    again = Agent(agent.config, background=False)
    assert again.status().version == "2.0.0"
    again.close()


def test_tampered_bundle_error_is_about_integrity(agent, bundles):
    with pytest.raises(BundleError, match="SHA-256|does not verify"):
        agent.install(bundles.tampered)


def test_downgrade_is_allowed_when_asked_and_same_bundle_is_a_no_op(agent, bundles):
    agent.install(bundles.v2)
    assert not agent.install(bundles.v2).changed
    result = agent.install(bundles.v1, allow_downgrade=True)
    assert (result.version, result.previous) == ("1.0.0", "2.0.0")


def test_rollback_swaps_current_and_previous_and_gc_keeps_two(agent, bundles, models):
    with pytest.raises(InstallError, match="no previous bundle"):
        agent.rollback()
    agent.install(bundles.v1)
    agent.install(bundles.v2)
    agent.install(bundles.v3)
    assert len(list(agent.store.bundles.iterdir())) == 2  # v1 was garbage-collected
    loaded = agent.rollback()
    assert loaded.manifest.version == "2.0.0" == agent.status().version
    np.testing.assert_allclose(
        agent.predict(models.x_test[1])[0], bare_outputs(models.int8, models.x_test[1])
    )
    assert agent.status().previous.startswith("digits-3.0.0-")
    assert [e["kind"] for e in events(agent)][-1] == "rolled_back"


def test_boot_falls_back_to_previous_when_current_is_incomplete(config_path, bundles, models):
    with Agent.from_config(config_path, background=False) as agent:
        agent.install(bundles.v1)
        agent.install(bundles.v2)
        current = agent.store.bundles / agent.store.pointer()["current"]
    # Power loss on a disk that lied about fsync: the model file is cut short.
    model_file = current / "model.tflite"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with Agent.from_config(config_path, background=False) as agent:
        assert agent.status().version == "1.0.0"
        np.testing.assert_array_equal(
            agent.predict(models.x_test[0])[0], bare_outputs(models.fp32, models.x_test[0])
        )
        kinds = [e["kind"] for e in events(agent)]
        assert kinds[-2:] == ["verify_failed", "recovered"]
        assert not current.exists()


def test_boot_with_no_servable_bundle_serves_nothing_and_says_so(config_path, bundles):
    with Agent.from_config(config_path, background=False) as agent:
        agent.install(bundles.v1)
        current = agent.store.bundles / agent.store.pointer()["current"]
    (current / "manifest.sig").write_bytes(b"\0" * 64)
    with Agent.from_config(config_path, background=False) as agent:
        assert not agent.status().serving
        assert [e["kind"] for e in events(agent)][-1] == "no_model"


def test_installed_state_is_plain_json_naming_two_directories(agent, bundles):
    agent.install(bundles.v1)
    agent.install(bundles.v2)
    doc = json.loads((agent.store.state_dir / "installed.json").read_text())
    assert doc["current"].startswith("digits-2.0.0-") and doc["previous"].startswith("digits-1.0.0-")


def test_bundle_over_the_configured_size_limit_is_refused(make_config, bundles):
    path = make_config("small", max_bundle_size=2048)
    with Agent.from_config(path, background=False) as agent:
        with pytest.raises(BundleError, match="limit"):
            agent.install(bundles.v1)
        assert agent.events.peek()[-1]["kind"] == "install_refused"


def test_config_kwargs_override_file(config_path):
    config = AgentConfig.load(config_path, threads=3, drift_window=50)
    assert (config.threads, config.drift_window, config.device) == (3, 50, "pi-01")


def test_a_running_agent_serves_what_another_process_committed(config_path, bundles, models):
    with Agent.from_config(config_path, background=False) as daemon:
        daemon.install(bundles.v1)
        assert not daemon.reload_if_changed()
        with Agent.from_config(config_path, background=False) as cli:  # e.g. `edgekit-agent install`
            cli.install(bundles.v2)
        assert daemon.reload_if_changed()
        assert daemon.status().version == "2.0.0"
        np.testing.assert_allclose(
            daemon.predict(models.x_test[0])[0], bare_outputs(models.int8, models.x_test[0])
        )


class _Where(os.PathLike):
    """A path-like that is neither str nor pathlib (what a caller's own path class looks like)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


@pytest.mark.parametrize("spelling", [str, _Where], ids=["str", "PathLike"])
def test_every_path_taking_api_takes_str_and_pathlike(spelling, tmp_path, config_path, bundles, models, key):
    with Agent.from_config(spelling(config_path), background=False) as agent:
        result = agent.install(spelling(bundles.v1))
        assert (result.version, result.changed) == ("1.0.0", True)
        assert agent.install(spelling(bundles.v2)).previous == "1.0.0"
    assert AgentConfig.load(spelling(config_path)).device == "pi-01"
    bundle = read_bundle(spelling(bundles.v1), TrustedKeys([key.public]))
    assert inspect_bundle(spelling(bundles.v1))[0].manifest.version == "1.0.0"
    bundle.extract(spelling(tmp_path / "out"))
    assert (tmp_path / "out" / "model.tflite").read_bytes() == models.fp32.read_bytes()
    made = tmp_path / "made" / "again.ekb"
    create_bundle(
        spelling(models.fp32),
        name="digits",
        version="1.0.1",
        key=key,
        output=spelling(made),
        baseline=spelling(models.data_npz),
    )
    assert read_bundle(made, TrustedKeys([key.public])).manifest.version == "1.0.1"
    assert Model(spelling(models.fp32), threads=1).input_details
    assert load_data(spelling(models.data_npz)).x.shape[1:] == (8, 8, 1)
    init_key(spelling(tmp_path / "home"), "k")
    assert [k.name for k in list_keys(spelling(tmp_path / "home"))] == ["k"]
    assert load_signing_key(spelling(tmp_path / "home"), "k").public == load_own_public_key(
        spelling(tmp_path / "home"), "k"
    )


def test_a_bundle_file_is_verified_through_a_map_and_served_from_its_file(config_path, bundles, tmp_path):
    """No copy of the bundle in memory: the model is served from its installed file (the runtime
    maps it), at install and after a restart; a refused file leaves nothing behind, and what a
    killed install left in unpacking/ is removed at start."""
    with Agent.from_config(config_path, background=False) as agent:
        agent.install(str(bundles.v1))
        assert agent.served_bundle().model._content is None
        with pytest.raises(BundleError, match="SHA-256"):
            agent.install(bundles.tampered)
        unpacking = agent.store.state_dir / "unpacking"
        assert list(unpacking.iterdir()) == []
        (unpacking / "999999999-dead").mkdir()  # a pid that cannot exist: its install was killed
        (unpacking / "999999999-dead" / "model.tflite").write_bytes(b"partial")
    with Agent.from_config(config_path, background=False) as restarted:
        assert restarted.served_bundle().model._content is None
        assert restarted.status().version == "1.0.0"
        assert list(unpacking.iterdir()) == []
