"""FlipLSTM under a real tf.distribute.MultiWorkerMirroredStrategy: two worker
processes on 127.0.0.1 (TF_CONFIG), the recipe of docs/deployment.md, against one
process with the same global batch and seed."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    out, index = sys.argv[1], int(sys.argv[2])       # index -1: one process, no cluster
    import kflip
    import larq as lq
    import numpy as np
    import tensorflow as tf

    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if index >= 0
                else tf.distribute.OneDeviceStrategy("/cpu:0"))
    d = kflip.data.digits()
    x, y = d.x_train[:256], d.y_train[:256]
    kw = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        bn = lambda: tf.keras.layers.BatchNormalization(synchronized=True, scale=False)
        model = tf.keras.Sequential([
            tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten(),
            lq.layers.QuantDense(32, **kw), bn(),
            lq.layers.QuantDense(10, input_quantizer="ste_sign", **kw), bn(),
            tf.keras.layers.Activation("softmax")])
        kflip.snap_binary_weights(model)
        opt = kflip.FlipLSTM()
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)   # 64 = global batch
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    model.fit(ds.with_options(options), epochs=2, verbose=0)
    name = "single" if index < 0 else f"worker{index}"
    np.savez(os.path.join(out, name + ".npz"),
             *[v.numpy() for v in kflip.binary_variables(model)])
    with open(os.path.join(out, name + ".json"), "w") as fh:
        json.dump({"replicas": strategy.num_replicas_in_sync,
                   "flips": list(opt.flip_counts().values())}, fh)
    """
)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start(out, index, cluster=None):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if cluster is not None:
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": cluster},
                                       "task": {"type": "worker", "index": index}})
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out), str(index)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]


def _read(out, name):
    with open(out / f"{name}.json") as fh:
        report = json.load(fh)
    with np.load(out / f"{name}.npz") as z:
        report["kernels"] = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
    return report


def test_two_workers_on_loopback_equal_one_process(tmp_path):
    cluster = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    workers = [_start(tmp_path, i, cluster) for i in range(2)]
    try:
        for proc in workers:
            _finish(proc)
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
    _finish(_start(tmp_path, -1))
    single = _read(tmp_path, "single")
    assert single["replicas"] == 1 and sum(single["flips"]) > 0
    for i in range(2):
        worker = _read(tmp_path, f"worker{i}")
        assert worker["replicas"] == 2
        assert worker["flips"] == single["flips"]
        for got, want in zip(worker["kernels"], single["kernels"]):
            np.testing.assert_array_equal(got, want)
            assert set(np.unique(got)) <= {-1.0, 1.0}
