"""segmentation_models_pytorch's decoders as flaxbones heads, faithful to smp 0.6.0.

`common` holds smp's shared blocks (Conv2dReLU, SCSE attention, the segmentation and
classification heads, the activations) and `SmpHead`, the heads' base; each decoder has its
own file defining its decoder, its `Smp<Name>Head` and the torch key `RULES` of an smp
model's `decoder.*` and `segmentation_head.*`. Whole models (encoder + decoder + heads) and
smp state-dict loading are `flaxbones.smp`.
"""
