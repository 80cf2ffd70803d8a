"""Detector inference throughput: flaxbones (jit) against torchvision (eager), same weights.

    python -m benchmarks.detection                            # every preset, its own image size
    python -m benchmarks.detection --models maskrcnn_resnet50_fpn --min-size 512 --images 4

Both sides get the same random weights (torchvision's initialisation, converted with
`fb.load_pretrained`) and the same images (photo-like noise at the preset's size). Timed:
torchvision's `model(images)` (its transform, network and postprocessing) against
`fb.detection.predict` (host preprocessing, the jitted model, host postprocessing), and the
jitted model alone on the preprocessed batch. The first call (compilation) is excluded from
the rates and reported on its own. Ratio > 1: flaxbones is faster.
"""
import argparse
import os
import platform
import tempfile
import time

import numpy as np

PRESETS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
           "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn",
           "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn",
           "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
           "ssd300_vgg16", "ssdlite320_mobilenet_v3_large")


def _images(count, size, seed=0):
    """Smooth random images (HWC uint8), aspect 3:4 as COCO's typical photo."""
    rng = np.random.default_rng(seed)
    h, w = size, size * 4 // 3
    out = []
    for _ in range(count):
        coarse = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3))
        out.append(np.repeat(np.repeat(coarse, 16, 0), 16, 1)[:h, :w].astype(np.uint8))
    return out


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(name, count, min_size, repeats, transform_kwargs):
    import jax
    import torch
    import torchvision

    import flaxbones as fb

    tv = torchvision.models.detection.__dict__[name](weights=None, weights_backbone=None,
                                                     **transform_kwargs).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.pth")
        torch.save(tv.state_dict(), path)
        variables = fb.load_pretrained(name, path)
    images = _images(count, min_size)
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]

    def torch_run():
        with torch.inference_mode():
            tv(tensors)

    model = fb.create_model(name)
    apply = jax.jit(lambda v, x, s: model.apply(v, x, s))
    batch, sizes, _ = fb.detection.preprocess(images, name, **transform_kwargs)
    start = time.perf_counter()
    jax.block_until_ready(apply(variables, batch, sizes))
    compile_s = time.perf_counter() - start
    fb.detection.predict(name, variables, images, **transform_kwargs)  # warm its own jit

    def flax_model():
        jax.block_until_ready(apply(variables, batch, sizes))

    torch_run()
    t_torch = _timed(torch_run, repeats)
    t_predict = _timed(lambda: fb.detection.predict(name, variables, images, **transform_kwargs),
                       repeats)
    t_model = _timed(flax_model, repeats)
    return dict(name=name, size=f"{batch.shape[1]}x{batch.shape[2]}", torch=count / t_torch,
                predict=count / t_predict, model=count / t_model, compile_s=compile_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=PRESETS)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=None,
                        help="transform min_size (default: the preset's own)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.images} images per call, images/s (median of "
          f"{args.repeats})")
    print("| detector | padded size | torchvision eager | fb predict | ratio | fb model only "
          "| ratio | first call s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        import flaxbones as fb
        own = dict(fb.detection.transform_settings(name))
        size = args.min_size or (own.get("fixed_size") or (own["min_size"],))[0]
        kwargs = {} if args.min_size is None else (
            {"min_size": size, "max_size": size * 5 // 3} if "fixed_size" not in own else {})
        r = measure(name, args.images, size, args.repeats, kwargs)
        print(f"| {r['name']} | {r['size']} | {r['torch']:.2f} | {r['predict']:.2f} | "
              f"{r['predict'] / r['torch']:.2f} | {r['model']:.2f} | {r['model'] / r['torch']:.2f} "
              f"| {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
