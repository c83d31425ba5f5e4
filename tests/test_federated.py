"""Federated training on Flower: partitions, the privacy accountant, FedProx's loss term, the simulation
engine (FedAvg rounds, checkpoints, exact resume, LoRA-only with DP) and the deployment engine with real
flower-superlink / flower-supernode processes on 127.0.0.1 (a client killed mid-round, the server killed
and started again)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="federated training needs flwr (pip install 'leantrain[federated]')")

from helpers import tiny_config  # noqa: E402
from leantrain import api  # noqa: E402
from leantrain.errors import DataError  # noqa: E402
from leantrain.federated import partition, privacy  # noqa: E402
from leantrain.tokens.dataset import TokenDataset  # noqa: E402

FED = {"model__dim": 32, "model__n_heads": 4, "model__n_kv_heads": 2, "train__micro_batch_size": 2,
       "train__eval_steps": 2, "optim__warmup_steps": 0, "federated__clients": 3, "federated__rounds": 2,
       "federated__local_steps": 2}


def fed_config(dataset, **over):
    return tiny_config(dataset, **{**FED, **over})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- partitions ------------------------------------------------------------------------------------------

def test_partitions_cover_every_document_once_and_skew_follows_alpha(dataset, tmp_path):
    ds = TokenDataset(dataset)
    docs = partition.documents(ds)
    assert docs.tokens.sum() == ds.num_tokens("train")
    tv = {}
    for scheme, alpha in (("iid", 1.0), ("natural", 1.0), ("dirichlet", 0.1), ("dirichlet", 100.0)):
        parts, labels = partition.assign(docs, 4, scheme, seed=0, alpha=alpha)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(docs))), scheme
        tv[(scheme, alpha)] = partition.skew(parts, docs, labels)["mean_label_tv_distance"]
    # natural: each client holds its own contiguous sources; Dir(0.1) is more skewed than Dir(100) and iid (on
    # ~50 documents of very different sizes even iid clients differ, so the margin is modest)
    assert tv[("natural", 1.0)] > tv[("iid", 1.0)]
    assert tv[("dirichlet", 0.1)] > max(tv[("dirichlet", 100.0)], tv[("iid", 1.0)]) + 0.1
    record = partition.make_partitions(dataset, tmp_path / "parts", 3, "natural", seed=0)
    for c in record["clients"]:
        client = TokenDataset(tmp_path / "parts" / f"client-{c['client']}")
        assert client.num_tokens("train") == c["tokens"] > 0
        assert client.num_tokens("val") == ds.num_tokens("val")  # the shared validation split
    assert json.loads((tmp_path / "parts" / "partitions.json").read_text())["scheme"] == "natural"


def test_a_client_left_without_data_is_refused(dataset, tmp_path):
    with pytest.raises(DataError, match=r"partition holds \d+ training tokens .* needs at least 65"):
        partition.make_partitions(dataset, tmp_path / "parts", 500, "natural", seed=0, min_tokens=65)
    assert not (tmp_path / "parts").exists()


# ---- privacy ---------------------------------------------------------------------------------------------

def _gaussian_delta(eps: float, sigma: float) -> float:
    """Exact delta(eps) of one Gaussian mechanism with sensitivity 1 and noise sigma (Balle & Wang 2018)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return phi(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * phi(-eps * sigma - 1 / (2 * sigma))


def test_accountant_epsilon_against_the_exact_gaussian_and_its_inverse():
    """T rounds with noise multiplier z compose exactly into one Gaussian with z / sqrt(T): the RDP epsilon
    must lie above that exact value (it is an upper bound) and within 25% of it, and below the classic
    Abadi/Mironov bound T/(2z^2) + sqrt(2 T log(1/delta)) / z."""
    rounds, z, delta = 10, 2.0, 1e-5
    eps = privacy.epsilon(z, rounds, per_round=3, clients=3, delta=delta)
    sigma = z / math.sqrt(rounds)
    lo, hi = 0.0, 100.0
    for _ in range(100):  # exact epsilon: delta(eps) falls with eps
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gaussian_delta(mid, sigma) > delta else (lo, mid)
    exact = hi
    classic = rounds / (2 * z * z) + math.sqrt(2 * rounds * math.log(1 / delta)) / z
    assert exact <= eps <= 1.25 * exact
    assert eps < classic
    noise = privacy.noise_for_epsilon(eps, rounds, 3, 3, delta)
    assert noise == pytest.approx(z, rel=2e-3)


# ---- FedProx's proximal term, through the Trainer ------------------------------------------------------------

def test_fedprox_term_keeps_the_client_near_the_global_weights(dataset, tmp_path):
    from leantrain.federated.client import local_train
    from leantrain.federated.weights import to_record
    from leantrain.model import Transformer

    cfg = fed_config(dataset, optim__lr=1e-2, federated__local_steps=3)
    import torch

    torch.manual_seed(0)
    start = to_record(Transformer(cfg.model), lora_only=False)
    base = start.to_numpy_ndarrays()

    def drift(mu: float) -> float:
        new, m = local_train(cfg, dataset, tmp_path / f"mu{mu}", start, 1, proximal_mu=mu)
        assert m["tokens"] == 3 * 2 * cfg.model.seq_len and math.isfinite(m["loss"])
        return math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(new.to_numpy_ndarrays(), base,
                                                                          strict=True)))

    assert drift(1000.0) < 0.5 * drift(0.0)


# ---- the simulation engine -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fedavg_run(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("fed") / "run"
    summary = api.federate(fed_config(dataset), run)
    return run, summary


def test_simulation_fedavg_logs_val_loss_per_round_and_checkpoints_the_global_model(fedavg_run):
    run, summary = fedavg_run
    lines = metrics(run)
    assert [r["round"] for r in lines] == [0, 1, 2]
    assert lines[2]["val_loss"] < lines[0]["val_loss"]
    assert all(r["clients_ok"] == 3 and r["clients_failed"] == 0 for r in lines[1:])
    assert sorted(c["client"] for c in lines[1]["clients"]) == [0, 1, 2]
    assert summary["tokens"] == 2 * 3 * 2 * 2 * 64  # rounds x clients x local steps x batch x seq_len
    # every round's global model is a leantrain checkpoint: the Python API evaluates it like any run's
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == ["step-0000001", "step-0000002"]
    assert api.evaluate(run) == pytest.approx(lines[2]["val_loss"], rel=1e-5)
    n_params = sum(t.numel() for t in api.load_model(run).model.parameters())
    # the ArrayRecord payload: float32 weights plus names and shapes
    assert lines[1]["bytes_sent"] == lines[1]["bytes_received"]
    assert 3 * 4 * n_params < lines[1]["bytes_sent"] < 1.05 * 3 * 4 * n_params
    written = json.loads((run / "federated.json").read_text())
    assert len(written["partitions"]["clients"]) == 3 and written["rounds"] == 2


def test_a_resumed_server_gives_the_uninterrupted_result(fedavg_run, dataset, tmp_path):
    """The server died after round 1's checkpoint: round 2's checkpoint and strategy state never came. Started
    again, it goes on from round 1, and (clients being deterministic) ends exactly where the whole run did."""
    run, _ = fedavg_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(copy / "checkpoints" / "step-0000002")
    for p in (copy / "federated").glob("round-0000002*"):
        p.unlink()
    summary = api.federate(fed_config(dataset), copy)
    assert summary["resumed_from_round"] == 1
    assert [r["round"] for r in metrics(copy)] == [0, 1, 2]
    assert metrics(copy)[2]["val_loss"] == metrics(run)[2]["val_loss"]
    assert json.loads((copy / "events.jsonl").read_text().splitlines()[-1])["event"] == "end"


def test_lora_only_federation_with_differential_privacy(dataset, tmp_path):
    cfg = fed_config(dataset, finetune__lora_rank=4, federated__lora_only=True, federated__dp_noise=1.0,
                     federated__dp_clip=0.5, federated__clients=2, federated__rounds=1)
    summary = api.federate(cfg, tmp_path / "run")
    model = api.load_model(tmp_path / "run").model  # adapters merged: count them from a fresh LoRA model
    from leantrain.model import Transformer
    from leantrain.model.lora import apply_finetune, is_adapter

    fresh = Transformer(cfg.model)
    apply_finetune(fresh, cfg.finetune)
    adapter = sum(p.numel() for n, p in fresh.named_parameters() if is_adapter(n))
    full = sum(p.numel() for p in model.parameters())
    # float32 adapters plus each tensor's name and shape (a few hundred bytes apiece): far below the full model
    assert 2 * 4 * adapter < summary["bytes_sent"] < 2 * (4 * adapter + 8 * 1000) < 2 * 4 * full / 5
    assert summary["dp_epsilon"] == pytest.approx(privacy.epsilon(1.0, 1, 2, 2, 1e-5), rel=1e-6)
    assert math.isfinite(summary["val_loss"])
    from leantrain.report import render

    assert f"ε = {summary['dp_epsilon']:.3g}" in render(tmp_path / "run")  # the report's federation section


def _weights(checkpoint: Path) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy() for n, p in api.load_model(checkpoint).model.named_parameters()}


def test_secure_aggregation_gives_fedavg_within_its_quantization(fedavg_run, dataset, tmp_path):
    """The same federation through Flower's SecAgg+: the server unmasks only the weighted sum of the clients'
    weights, each clipped to +-secagg_clip and stochastically rounded to 2^22 levels. After round 1 the global
    model is plain FedAvg's to within one such level, and not bit-equal (it did go through the masks)."""
    run, _ = fedavg_run
    secure = tmp_path / "run"
    summary = api.federate(fed_config(dataset, federated__secure_aggregation=True), secure)
    level = 2 * 8.0 / 2**22
    plain, masked = _weights(run / "checkpoints" / "step-0000001"), _weights(secure / "checkpoints" / "step-0000001")
    diff = max(float(np.abs(plain[n] - masked[n]).max()) for n in plain)
    assert 0 < diff <= level
    lines, plain_lines = metrics(secure), metrics(run)
    assert [r["round"] for r in lines] == [0, 1, 2] and all(r["clients_ok"] == 3 for r in lines[1:])
    assert sorted(c["client"] for c in lines[2]["clients"]) == [0, 1, 2]
    assert lines[2]["val_loss"] == pytest.approx(plain_lines[2]["val_loss"], rel=1e-4)
    # back: masked vectors of 64-bit integers (twice the float32 weights); out: the weights plus the key exchange
    assert lines[1]["bytes_received"] > 1.8 * plain_lines[1]["bytes_received"]
    assert plain_lines[1]["bytes_sent"] < lines[1]["bytes_sent"] < 1.1 * plain_lines[1]["bytes_sent"]
    assert summary["secure_aggregation"] is True and summary["tokens"] == metrics(run)[2]["tokens"]


def test_fedyogi_with_clients_trained_in_parallel(dataset, tmp_path):
    """sim_parallel = 2: the round's clients train in two Ray actors at once (two processes; with 1 all three
    share one), and FedYogi's server step follows its rule from the moments it keeps for resume:
    w2 = w1 + eta m2 / (sqrt(v2) + tau), with Yogi's second moment v2 = v1 - (1 - b2) d2^2 sign(v1 - d2^2) for
    the round's mean update d2 = (m2 - b1 m1) / (1 - b1), which Adam's b2 v1 + (1 - b2) d2^2 does not fit."""
    from safetensors.numpy import load_file

    eta, tau, b1, b2 = 0.01, 1e-3, 0.9, 0.99  # server_lr, server_tau and Flower's FedYogi betas
    run = tmp_path / "run"
    api.federate(fed_config(dataset, federated__strategy="fedyogi", federated__sim_parallel=2,
                            federated__local_steps=1, federated__server_lr=eta, federated__server_tau=tau), run)
    lines = metrics(run)
    assert [r["clients_ok"] for r in lines[1:]] == [3, 3]
    assert len({_progress(run, c)["pid"] for c in range(3)}) == 2
    s1, s2 = (load_file(run / "federated" / f"round-000000{r}.safetensors") for r in (1, 2))
    w1, w2 = _weights(run / "checkpoints" / "step-0000001"), _weights(run / "checkpoints" / "step-0000002")
    assert set(w1) == {k.split("/", 1)[1] for k in s2 if k.startswith("m_t/")}
    yogi_err, adam_err = 0.0, 0.0
    for n in w1:
        m1, v1, m2, v2 = (s[f"{kind}/{n}"].astype(np.float64) for s in (s1, s2) for kind in ("m_t", "v_t"))
        np.testing.assert_allclose(w2[n] - w1[n], eta * m2 / (np.sqrt(v2) + tau), rtol=1e-3, atol=1e-6)
        d2 = (m2 - b1 * m1) / (1 - b1)
        clear = np.abs(v1 - d2**2) > 1e-3 * v1  # where float32 rounding cannot flip the sign
        scale = float(np.abs(v2).max())
        yogi = v1 - (1 - b2) * d2**2 * np.sign(v1 - d2**2)
        yogi_err = max(yogi_err, float(np.abs(yogi - v2)[clear].max()) / scale)
        adam_err = max(adam_err, float(np.abs(b2 * v1 + (1 - b2) * d2**2 - v2)[clear].max()) / scale)
    assert yogi_err < 1e-4 < adam_err


def test_report_has_a_federation_section(fedavg_run, tmp_path):
    from leantrain.report import render

    run, _ = fedavg_run
    html = render(run)
    fed = html[html.index("<h2>Federation</h2>"):html.index("<h2>Predicted vs measured</h2>")]
    assert "Loss per round" in fed and "Communication per round" in fed and "Train loss per client" in fed
    rows = re.findall(r"<tr><td class=n>(\d+)</td><td class=n>([\d.]+)</td>", fed)
    assert [int(r) for r, _ in rows] == [0, 1, 2]
    assert [float(v) for _, v in rows] == [round(r["val_loss"], 4) for r in metrics(run)]
    mb = metrics(run)[1]["bytes_sent"] / 1e6
    assert f"<td class=n>{mb:.3f}</td>" in fed and "ε" not in fed
    # a training run's records (no round, no federated.json) give no such section
    from leantrain.report.federated import section

    assert section(tmp_path, [{"step": 1, "loss": 5.0, "val_loss": 5.1}]) == ""


# ---- the deployment engine: real SuperLink and SuperNode processes -------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, cond, timeout: float, procs: list) -> None:
    """Poll `cond` until true; fail (naming `what` and any process that died) after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    dead = [p.args[0] for p in procs if p.poll() is not None]
    pytest.fail(f"timed out waiting for {what} (exited: {dead})")


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:  # a zombie (exited, not yet reaped by the SuperNode) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _progress(run: Path, client: int) -> dict:
    try:
        return json.loads((run / "clients" / f"client-{client}" / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.skipif(not shutil.which("flower-superlink", path=str(Path(sys.executable).parent)),
                    reason="flower-superlink is not installed next to this Python (pip install 'leantrain[federated]')")
def test_deployment_engine_three_supernodes_survives_a_killed_server_and_a_dead_client(dataset, tmp_path):
    from leantrain.federated.deploy import write_app

    bin_dir = Path(sys.executable).parent
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"  # the SuperNode starts flower-superexec from PATH
    env = {**os.environ, "PATH": path, "FLWR_HOME": str(tmp_path / "home")}
    link = _free_port()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    run = tmp_path / "run"
    config = tmp_path / "fed.toml"
    config.write_text(f'[data]\npath = "{dataset}"\n[model]\nn_layers = 2\ndim = 32\nn_heads = 4\nn_kv_heads = 2\n'
                      'seq_len = 64\nvocab_size = 512\n[train]\nmicro_batch_size = 2\neval_steps = 2\nthreads = 1\n'
                      'sample_tokens = 0\n[precision]\ndtype = "fp32"\n[federated]\nclients = 3\nrounds = 3\n'
                      'local_steps = 1\nmin_available = 2\nmin_replies = 2\nround_timeout = 60\n')
    # threads = 1: three ClientApps train at once on 2 cores; two threads each oversubscribe them many times over
    # round_timeout: each message starts a fresh ClientApp process (python + torch, ~5 s on 2 busy cores), and the
    # round with the dead client waits this long for its reply before aggregating the other two
    app = write_app(tmp_path / "app", config, run).parent
    procs: list[subprocess.Popen] = []

    def start(*args: str, log: str) -> subprocess.Popen:
        p = subprocess.Popen([str(bin_dir / args[0]), *args[1:]], env=env, cwd=tmp_path, start_new_session=True,
                             stdout=open(tmp_path / log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        procs.append(p)
        return p

    def flwr_run() -> subprocess.Popen:
        return start("flwr", "run", str(app), "local", "--stream", log=f"flwr-run-{len(procs)}.log")

    try:
        start("flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
              "--disable-runtime-dependency-installation", log="superlink.log")
        for i in range(3):
            start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1",
                  "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions=3",
                  log=f"node{i}.log")
        _wait("the SuperLink", lambda: socket.socket().connect_ex(("127.0.0.1", link)) == 0, 30, procs)
        first = flwr_run()
        # after round 2's checkpoint the ServerApp process (the holder of the run directory's lock) is killed
        _wait("round 2's checkpoint", lambda: (run / "checkpoints" / "step-0000002").is_dir(), 120, procs)
        server_pid = json.loads((run / ".lock").read_text())["pid"]
        os.kill(server_pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            first.wait(timeout=10)  # its log stream ends with the run; nothing of ours depends on it
        # the dead server may have started round 3: its ClientApps finish (or fail) on their own; wait them out so
        # they neither hold a client's folder nor are mistaken below for the resumed run's
        first_run = _progress(run, 2)["run"]
        _wait("the first run's ClientApps", lambda: not any(_alive(_progress(run, c).get("pid")) for c in range(3)),
              90, procs)
        second = flwr_run()  # the same app again: it resumes after round 2
        # round 3: client 2's ClientApp process dies mid-round (SIGKILL); the round goes on with the other two
        _wait("client 2 in round 3", lambda: _progress(run, 2).get("round") == 3
              and _progress(run, 2).get("run") != first_run, 90, procs)
        os.kill(_progress(run, 2)["pid"], signal.SIGKILL)
        _wait("round 3", lambda: (run / "federated.json").is_file(), 120, procs)
        second.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    lines = metrics(run)
    assert [r["round"] for r in lines] == [0, 1, 2, 3]
    assert lines[1]["clients_ok"] == lines[2]["clients_ok"] == 3
    assert lines[3]["clients_ok"] == 2 and lines[3]["clients_failed"] == 1
    assert sorted(c["client"] for c in lines[3]["clients"]) == [0, 1]
    assert lines[3]["val_loss"] < lines[0]["val_loss"]
    events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert "federated_resume" in events
    assert json.loads((run / "federated.json").read_text())["resumed_from_round"] == 2
