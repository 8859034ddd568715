"""Numbers shared by every backend: gate order, telemetry thresholds and the telemetry memory layout.

The Triton kernels import this module (and nothing else from fastlstm), so it must stay free of torch and triton.
docs/telemetry.md defines what each quantity means.
"""

import os

GATES = ("i", "f", "g", "o")  # nn.LSTM's order of the four gate blocks in W_ih, W_hh and the biases

# A sigmoid gate is saturated outside [SIGMOID_LOW, 1 - SIGMOID_LOW]; the tanh candidate g when |g| > TANH_HIGH.
SIGMOID_LOW = 0.05
TANH_HIGH = 0.95

# Columns of Telemetry.stats, a float64 [slots, NUM_STATS] tensor (slot = layer * num_directions + direction).
STAT_SATURATED = 0  # columns 0..3: saturated counts of gates i, f, g, o
STAT_ELEMENTS = 4  # counted (sequence, timestep, unit) triples
STAT_FORGET_SUM = 5  # sum of sigma(f)
STAT_CELL_ABSMAX = 6  # max |c_t|, kept with an atomic max (values are >= 0, NaN propagates)
STAT_LAUNCHES = 7  # forward launches of this slot
NUM_STATS = 8

# Rows of Telemetry.grad, a float64 [slots, NUM_GRAD_ROWS, capacity] tensor indexed by timestep.
GRAD_SUMSQ = 0  # sum over backward passes of ||dL/dh_t||^2
GRAD_PASSES = 1  # number of backward passes that reached t
GRAD_CELL_SUMSQ = 2  # sum over backward passes of ||dL/dc_t||^2
NUM_GRAD_ROWS = 3

# The first non-finite value of a window is one int64 per stage (forward, backward), kept with an atomic minimum.
# A forward writes only forward tensors and a backward only backward ones, which torch.compile requires of tensors
# that both passes update. The key's fields, most significant first, make the numeric minimum the first event in
# execution order: the pass (module forward call), the stage, the launch's place in the stage (forward: bottom-up,
# backward: top-down, direction 0 before 1), the step in the launch's own time order, the tensor in checking order.
NO_NONFINITE = 2**63 - 1
TENSOR_BITS = 3
STEP_BITS = 24
ORDER_BITS = 8
STAGE_BITS = 1
SEQ_BITS = 63 - TENSOR_BITS - STEP_BITS - ORDER_BITS - STAGE_BITS
STEP_SHIFT = TENSOR_BITS
ORDER_SHIFT = STEP_SHIFT + STEP_BITS
STAGE_SHIFT = ORDER_SHIFT + ORDER_BITS
SEQ_SHIFT = STAGE_SHIFT + STAGE_BITS
STEP_MAX = 2**STEP_BITS - 1  # a descending launch stores STEP_MAX - t, so its earlier steps have smaller keys
SEQ_MAX = 2**SEQ_BITS - 1
MAX_SLOTS = 2**ORDER_BITS

STAGE_FORWARD = 0
STAGE_BACKWARD = 1
STAGES = ("forward", "backward")
# Tensors in the order a step computes them (docs/telemetry.md).
FORWARD_TENSORS = ("input", "gates", "cell", "hidden")
BACKWARD_TENSORS = ("grad_output", "grad_hidden", "grad_cell", "grad_gates")


# TRITON_INTERPRET as triton 3.6 reads it (a boolean: these values in any case; anything else, "2" or "false"
# included, leaves its interpreter off), so that fastlstm and triton never disagree on whether kernels interpret.
_TRUE = ("1", "true", "yes", "y", "on")


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE
