"""One process per chip under torchrun: pipeline stages (torch.distributed.pipelining) × data-parallel
replicas (DDP) on a 2-D device mesh. See docs/distributed.md.

    mesh.py         rank -> (pipeline stage, replica); process group, backend per device type
    stage.py        one stage's module: a CausalLM piece, what crosses the boundary, the loss
    pipeline.py     GPipe / 1F1B / interleaved 1F1B schedules over this rank's stages
    trainable.py    what trains, with the adapter a single process would draw
    replicas.py     data-parallel replicas (DDP over the mesh's data dimension)
    runner.py       this rank's stages as a runner of the shared step (chipspan.train.step)
    checkpoints.py  each stage's share of a checkpoint, loaded into any split
    recipe.py       the job, top to bottom (the loop and outputs are chipspan.train's)
    launch.py       in-process or torchrun: which path a `chipspan train` takes
"""
