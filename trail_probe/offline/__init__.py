"""What the offline pipeline's stages build on: the prompt sources, the extraction format and the
decode loop that fills it, the split, the Lightning modules, the artifacts the stages hand each
other (probe folders, the layer choice, the label prior), metrics, and each stage's report."""
