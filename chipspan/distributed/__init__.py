"""One process per chip under torchrun: pipeline stages (torch.distributed.pipelining) × data-parallel
replicas (DDP) on a 2-D device mesh. See docs/distributed.md.

    mesh.py         rank -> (pipeline stage, replica); process group, backend per device type
    stage.py        one stage's module: a CausalLM piece, what crosses the boundary, the loss
    pipeline.py     GPipe / 1F1B / interleaved 1F1B schedules over this rank's stages
    trainable.py    what trains, with the adapter a single process would draw
    gradients.py    replica sums, tied embeddings across stages, the global clipping norm
    loop.py         the training loop of one rank
    checkpoints.py  checkpoints gathered into single-process files, loaded into any split
    recipe.py       the job, top to bottom
    launch.py       in-process or torchrun: which path a `chipspan train` takes
"""
