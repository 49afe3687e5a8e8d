"""Private switches, read by halo's code at each compile, to measure what one of its settings
saves (benchmarks/decoder_step.py --as-is). Not an API: every switch is on in normal use.

    from halo_compile import _flags
    _flags.static_launch = False  # before compiling
"""

# An input several halo kernel launches share is computed once (halo_compile/inductor_patches.py,
# `realize_user_kernel_inputs`).
realize_user_kernel_inputs = True
# halo's kernels launched through Inductor's static CUDA launcher (`static_launch_config`).
static_launch = True
# Un-rotated gradients summed before one un-rotation (passes/merge_unrotations.py).
merge_unrotations = True
