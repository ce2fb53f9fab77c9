"""Where OpenVINO's INT8 compilation of a QDQ ONNX departs from ONNX Runtime's literal Q/DQ run.

For an exported graph and a random input of the given shape, prints the relative L2 distance
between OpenVINO's (CPU) and ONNX Runtime's (all graph rewrites off, so every QuantizeLinear /
DequantizeLinear runs as written) first output, first for the graph as it is, then with the
outputs of each group of nodes also made graph outputs. A node whose output is a graph output
cannot be fused into its consumers, so the group that brings the distance down to the int8
noise level holds the fusion at fault::

    python benchmarks/openvino_probe.py /tmp/conf_art/int8.onnx --shape 2 101 40 \\
        --groups /cnn/convblock_0/convs/conv_0/conv/Conv bottleneck LayerNormalization MatMul

A group is an op type (every node of that type) or a substring of node names.
"""
import argparse

import numpy as np


def distance(path, x, expose=()):
    import onnx
    import onnxruntime as ort
    import openvino as ov

    model = onnx.load(path)
    first = model.graph.output[0].name
    for name in expose:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    data = model.SerializeToString()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x}
    ref = session.run([first], feeds)[0]
    core = ov.Core()
    compiled = core.compile_model(core.read_model(data, b""), "CPU")
    got = compiled(feeds)[compiled.output(first)]
    return float(np.linalg.norm(ref - got) / np.linalg.norm(ref))


def main(argv=None):
    import onnx

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx")
    p.add_argument("--shape", type=int, nargs="+", required=True, help="input shape, e.g. 2 101 40")
    p.add_argument("--groups", nargs="*", default=[], help="op types or node-name substrings to expose")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    x = (np.random.default_rng(args.seed).standard_normal(args.shape) * 3).astype(np.float32)
    nodes = [n for n in onnx.load(args.onnx).graph.node if n.op_type not in ("Constant", "QuantizeLinear")]
    print(f"as exported: relative L2 {distance(args.onnx, x):.4f}")
    for group in args.groups:
        names = [n.output[0] for n in nodes if n.op_type == group or group in n.name]
        print(f"{group} outputs exposed ({len(names)} nodes): relative L2 {distance(args.onnx, x, names):.4f}")


if __name__ == "__main__":
    main()
