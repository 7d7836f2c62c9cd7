"""Thresholds and cadences: the one place where gradwatch's default sensitivities are decided.

Every detector, remedy, the advice and the audit take their defaults from here, each with the
reason for its value. The "measured" figures come from the models of ``tests/zoo.py`` trained for
150 steps with SGD or Adam on synthetic data (see ``tests/test_detectors.py``).
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------- detectors

VANISHING_RATIO = 1e-2
"""Vanishing: geometric-mean gradient RMS of the first quarter of the layers over that of the last
quarter. Healthy models stay above ~3e-2 (an LSTM's recurrent layer against its head, the worst
measured), ReLU+He+BatchNorm, residual and CNN models above ~0.15; a default-initialised 20-layer
tanh MLP sits near 3e-4 and a sigmoid one near 1e-13. Below 1e-2 the first layers learn at least a
hundred times slower than the last ones under SGD."""

VANISHING_PATIENCE = 10
"""Vanishing: consecutive valid steps the ratio must stay below the threshold, so that one odd
batch never fires it; short enough to fire within the first few dozen steps."""

EXPLODING_ADAPTIVE_UPDATE = 0.3
"""Exploding (update size), Adam family: the relative update ``lr * sqrt(numel) / ||w||`` (every
element moves by about ``lr``). Measured on healthy runs (200 steps, AdamW): BERT-tiny (weights of
std 0.02) at lr 1e-3 0.050 (0.045 by step 50), an LSTM language model 0.014, EfficientNet (tiny
config) 0.052, a 3-layer MLP on targets of scale 100 under fp16 GradScaler 0.014. After an LR x100
at step 50: BERT-tiny 4.5 and the LSTM 1.2 at that very step (x1000: 45). 0.3 leaves a factor 6
above healthy BERT and 4 below the smallest divergence measured."""

EXPLODING_SGD_UPDATE = 1.5
"""Exploding (update size), SGD: the relative update ``lr * ||g|| / ||w||``. Measured on healthy
runs (150 steps, SGD with momentum 0.9 at lr 0.05 unless said): ReLU+He+BatchNorm MLP 0.17 (step
0), small CNN 0.010, residual MLP with zero-initialised branches 0.41, EfficientNet 0.015, an
LSTM language model at lr 1 0.016, and the worst, the 33-element output layer of a 20-layer sigmoid
MLP at lr 0.1: 1.01. Pathological: the gain-3 Elman RNN 3.9 at step 0 (lr 0.01) and 39 (lr 0.1);
a wide GELU MLP at lr 0.5 3.0 at step 1 (9.3, 1.2e3 next; NaN at step 5); the LSTM language model
after an LR x100 1.5 then 1.9 one step later. An update 1.5 times the size of the weights replaces
them."""

EXPLODING_WEIGHT_FLOOR = 0.5
"""Exploding (update size): the weight RMS a layer's update is compared with is at least this
fraction of the median weight RMS of the model, so that zero-initialised layers (residual branch
outputs, zero-initialised heads) are not divided by zero or by their first tiny weights: a
zero-initialised layer in a model of std-0.02 weights under AdamW(lr=1e-3) gets 0.1, below
:data:`EXPLODING_ADAPTIVE_UPDATE` (a floor of 0.1 would give 0.5 and a false alarm)."""

EXPLODING_PROFILE_ONCE = 300.0
"""Exploding (profile): first-quarter over last-quarter gradient RMS (the mirror of
:data:`VANISHING_RATIO`) above which one step fires. Healthy models stay below ~20 (ReLU+He+
BatchNorm MLP at step 0: 19.9, 1.3 typical; CNN, residual, LSTM, BERT-tiny below 2.3); the gain-3
tanh Elman RNN sits at 489 at step 0 (and 300-1250 while it keeps exploding under Adam)."""

EXPLODING_PROFILE_RATIO = 100.0
"""Exploding (profile): the same ratio above which gradients explode when it holds for
:data:`EXPLODING_PROFILE_PATIENCE` valid steps: five times the worst healthy value measured."""

EXPLODING_PROFILE_PATIENCE = 10
"""Exploding (profile): consecutive valid steps above :data:`EXPLODING_PROFILE_RATIO`, as for
vanishing."""

NORM_GROWTH = 30.0
"""Exploding (norm growth, opt-in): factor by which the total gradient norm must grow over
:data:`NORM_GROWTH_WINDOW` steps (1.19x per step, sustained). Healthy runs mostly rise at most ~7x
over their first 50 steps (BERT-tiny under AdamW: 0.17 to 1.2), but one climbed 63x in 20 steps
at its learning transition (BERT-tiny, majority vote, AdamW 1e-4, step 165): hence opt-in. A total
norm
growing 1.2x per step (which the spike detector, whose EMA follows the trend, never flags below
1.5x per step) fires after 19 steps of the climb, 1.3x after 14."""

NORM_GROWTH_WINDOW = 20
"""Exploding (norm growth): steps over which the growth is measured; each half must grow too."""

SPIKE_Z = 6.0
"""Spike: z-score of the log-norm against its EMA mean and deviation. Six deviations is far outside
batch-to-batch noise (whose log-norm deviation is typically 0.1-0.3)."""

SPIKE_MIN_RATIO = 3.0
"""Spike: the total norm must also be at least this many times its EMA (geometric) mean, so that a
very steady norm (tiny deviation) does not fire on a modest change."""

SPIKE_LAYER_MIN_RATIO = 10.0
"""Spike: a single layer's norm must be at least this many times its EMA mean. Single layers are
far noisier than their sum: BERT-tiny under AdamW at lr 1e-3 (healthy) had 16 attention/dense
layers jump 3-6x together at step 25 (the total stayed within 3x)."""

SPIKE_BETA = 0.95
"""Spike: EMA decay of the log-norm mean and variance (a memory of ~20 steps), as in ZClip."""

SPIKE_WARMUP = 20
"""Spike: valid steps of a norm seen before it can spike (plain running mean meanwhile): the first
steps of training change norms fast and the statistics need samples. With the per-layer ratio of
:data:`SPIKE_LAYER_MIN_RATIO`, 20 keeps BERT-tiny, GPT-2, ViT, LLaMA and ResNet (tiny configs, two
seeds, 200 steps) quiet; 50 was not needed and would blind the first 50 steps."""

SATURATION_MARGIN = 0.01
"""Saturation: an output within this distance of a bound of its activation's range is in a flat
region (sigmoid outside [0.01, 0.99], where its slope is below 4% of its peak; |tanh| > 0.99, below
2%)."""

SATURATION_FRACTION = 0.5
"""Saturation: fraction of a module's outputs in the flat regions. At default initialisation
sigmoid/tanh networks have almost none; above half, most of the layer passes no gradient."""

SATURATION_PATIENCE = 20
"""Saturation: consecutive steps the fraction must stay above the threshold (transients while the
weights settle are ignored)."""

DEAD_FRACTION = 0.5
"""Dead units: fraction of a rectifier's units that produced no positive output for ``DEAD_WINDOW``
steps. A few dead units are normal; half the layer means its capacity is gone."""

DEAD_WINDOW = 50
"""Dead units: steps without a positive output after which a unit counts as dead: over 50 batches
a live unit fires."""

DEAD_TOTAL_WINDOW = 20
"""Dead units: steps after which a module none of whose units produced a positive output is
reported. A whole layer silent for 20 batches passes no gradient at all (every layer before it gets
an exactly-zero gradient); healthy ReLU layers always have live units."""

ZERO_GRAD_PATIENCE = 50
"""Zero gradient: consecutive valid steps of an exactly-zero layer gradient. A zero-initialised
residual branch gives its input layer a zero gradient only at step 0; a layer that got nothing for
50 steps learns nothing."""

STAGNATION_RATIO = 1e-6
"""Stagnation: per-layer ``||Δw|| / ||w||`` of one update. Healthy training is ~1e-4 to 1e-2; below
1e-6 a float32 update moves each weight by a few units in the last place: the layer is frozen."""

STAGNATION_PATIENCE = 3
"""Stagnation: consecutive update measurements (one per flush with ``track_updates=True``) below the
threshold: one quiet update (e.g. a learning-rate warm-up at 0) is not stagnation."""

AMP_PERSISTENT_STEPS = 64
"""AMP: consecutive GradScaler overflow steps after which non-finite gradients count as a real
NaN/Inf even while the scaler's scale is still >= 1 (a scale below 1 counts at once)."""

# ---------------------------------------------------------------------------------------- alerts

ALERT_CLEAR_STEPS = 10
"""Alerts: probed steps without a detection after which a condition counts as cleared, so that its
return is a new alert. Sustained conditions (vanishing, dead units, saturation, stagnation, NaN)
fire at every step while they hold, and a divergence fires within a few steps of the previous
detection; ten quiet steps are a clear break. The former 100-step cooldown merged BERT-tiny's
divergence at step 51 (LR x1000 at step 50) into a spike episode of step 25, long cleared."""

ALERT_ESCALATION = 10.0
"""Alerts: a detection whose value is this many times worse than the worst value since the
episode's latest alert (larger for exploding/spike, smaller for vanishing/stagnation ratios) is a
new alert even while the condition continues: an order of magnitude is never noise of one
condition (batch-to-batch norm noise is a factor of 1.1-1.5)."""

MAILBOX_DEPTH = 4
"""Early alerts: steps whose detection flags may be in flight to the host at once (CUDA). When the
host runs this many steps ahead of the device, posting waits for the oldest copy, which finished
long ago on the device's timeline, so the device never idles for it."""

# -------------------------------------------------------------------------------------- remedies

CLIP_EPS = 1e-6
"""Clipping: ``torch.nn.utils.clip_grad_norm_`` divides by ``total_norm + 1e-6``; so do the norm
clippers, so that ``ClipNorm`` equals it."""

AUTOCLIP_MAX_HISTORY = 10_000
"""AutoClip(window=None) keeps the whole history up to this many most recent steps (40 kB)."""

# ---------------------------------------------------------------------------------------- advice

INIT_BAND = (0.7, 1.45)
"""Advice: weights are "He-scaled" (or "Xavier-scaled") when the median ratio of their std to that
scheme's std lies in this band. PyTorch's default Linear/Conv init gives 1/sqrt(6) ~ 0.41 of He."""

INIT_TOO_SMALL = 0.7
"""Advice and audit: weights below this fraction of He scale shrink ReLU signals layer by layer."""

INIT_TOO_LARGE = 1.5
"""Advice and audit: a weight std this many times the He (Xavier) std makes activations grow layer
by layer."""

DEEP_LAYERS = 10
"""Advice: a network with at least this many Linear/Conv layers in a chain counts as deep."""

INIT_SAMPLE = 65536
"""Profile: a weight with more elements has its std measured on an evenly strided sample of about
this many (the std of 65,536 draws is within 0.6% of the weight's with 95% confidence): a
billion-parameter model is profiled in a fraction of a second."""

MAX_EIG_SIZE = 1024
"""Profile: largest recurrent matrix whose eigenvalues are computed (cost grows with size ** 3)."""

ORTHOGONAL_TOLERANCE = 0.1
"""Profile: a recurrent matrix with ``||W W^T / c - I||_F / sqrt(H)`` below this is orthogonal up
to the scale ``c``."""

FORGET_BIAS_SET = 0.5
"""Advice: LSTM forget-gate biases (``b_ih + b_hh``) averaging at least this count as "initialised
to ~1"."""

RADIUS_TOO_LARGE = 1.05
"""Audit: spectral radius of a plain RNN's recurrent matrix above which gradients grow through
time."""

# ----------------------------------------------------------------------------------------- audit

SINGLE_STEP_VANISHING_RATIO = 1e-3
"""Audit: first-layer / last-layer gradient RMS (one step, no patience) below which the audit
reports VANISHING at step 0. A 30-layer Tanh MLP with PyTorch's default initialisation sits near
1e-8 and a 20-layer Sigmoid MLP near 1e-17, while a healthy ReLU + He + BatchNorm MLP stays within
a factor of ~10 of 1: three orders of magnitude leave a wide margin on both sides. Stricter than
:data:`VANISHING_RATIO` because one step has no patience window."""
