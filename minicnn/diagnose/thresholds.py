"""Every threshold the diagnosis uses, named, with the reason and the numbers it came from."""
# Overshoot: the loss on the SAME batch rose after the step. A small enough step always lowers it
# (to first order by lr*|g|^2), so a rise means the step went past the valley along its own
# direction. Float32 rounding and tiny losses make very small rises meaningless: require both.
OVERSHOOT_ABS = 0.01
OVERSHOOT_REL = 0.02
# ... but a rise alone is not an event: healthy runs overshoot now and then. Measured on the
# built-in data (small net, 564 steps of batch 64): 4% of steps at lr 0.1 and 5% at lr 0.05 raised
# their own batch's loss, isolated, by at most +1.0 nats (0.40 -> 1.41), and the run carried on
# learning (98.5% / 96.4% val acc). An overshoot EVENT is either one step that threw the loss far
# up (a catapult: +OVERSHOOT_BIG_ABS nats and OVERSHOOT_BIG_FACTOR x its value -- the injected
# lr-10 step went 0.35 -> 806), or overshooting that is the rule rather than the exception: at
# least OVERSHOOT_SHARE of the OVERSHOOT_WINDOW steps around it rose (healthy: 4-5% of steps,
# never clustered; a run that jumps around: most of them).
OVERSHOOT_BIG_ABS = 1.5
OVERSHOOT_BIG_FACTOR = 3.0
OVERSHOOT_WINDOW = 20
OVERSHOOT_SHARE = 0.3
# Spike: the batch loss jumps far above its recent level. SGD noise moves the batch loss by tens of
# percent; healthy runs above showed isolated batches at 3-5x the running median but never more than
# +0.65 nats above it (0.82 vs 0.15-0.27), so a spike must be 3x AND a full nat above.
SPIKE_WINDOW = 50
SPIKE_FACTOR = 3.0
SPIKE_ABS = 1.0
# Oscillation: consecutive gradients pointing against each other (cosine < 0) means bouncing
# across a valley. But mini-batch gradients of a healthy run do that too: the mean cosine over the
# whole run was -0.26 at lr 0.1 and -0.40 at lr 0.05, with 20-step stretches down to -0.72, while
# the loss kept falling (the bounce is across the sharpest direction; progress is along the others).
# Over 20 steps the smoothed loss of those runs sometimes stood still too (noise), but over 100
# steps it always fell by a third or more. So oscillation is strong anti-alignment over OSC_WINDOW
# steps while the loss made no progress over the OSC_PROGRESS_WINDOW steps before.
OSC_WINDOW = 20
OSC_MEAN_COS = -0.5
OSC_PROGRESS_WINDOW = 100
OSC_PROGRESS = 0.05       # the smoothed loss fell by less than this share across that window
# Dead layer: a ReLU layer with this share of its units zero for every image passes (almost) no
# gradient to the layers below.
DEAD_LAYER = 0.9
# Dead layers and a constant prediction are read from the probe: the same PROBE_SIZE held-out
# images every PROBE_EVERY steps (minicnn.config). On a training batch a unit is "dead" when it is
# zero for the batch's few images: on batches of 2 the explain case-3 runs read 95-99% dead while
# they learned to 65-90% val accuracy, and one run listed 178 one-step "dead" episodes. Without a
# probe (runs recorded before it, --probe-every 0) the training batch stands in only from this
# many images up: at batch 32+ the batch figures of the healthy runs stayed below 60% dead.
BATCH_EVIDENCE_MIN = 32
# Collapse: (nearly) the whole batch predicted as one class and the batch loss within this many nats
# of the label entropy (ln 10 for 10 balanced classes): the network outputs a constant. A batch's
# composition moves a constant predictor's loss around the entropy (2.40 against 2.303 on the
# collapsed run with an injected lr-9 step, batch 64), so the band is 0.3 nats (written before as
# 3 x 0.1 at each use).
COLLAPSE_SHARE = 0.9
COLLAPSE_LOSS_TOL = 0.3
# ... for at least this many steps: a fresh network often predicts one class for its first few
# steps (tiny logits, loss ln 10) and then moves on; that is not a collapse.
COLLAPSE_MIN_STEPS = 50
# Stall: for this many steps the gradient is below this fraction of its typical early size and
# the smoothed loss is flat, while far above the best (smoothed) loss seen.
STALL_WINDOW = 100
# "early" and "before": the median over the first EARLY_STEPS steps (of the run, or before the
# decisive step) is the reference level of a per-step quantity such as the gradient norm.
EARLY_STEPS = 50
STALL_GRAD_FRAC = 0.1
STALL_FLAT = 0.05
STALL_ABOVE_BEST = 0.5
# Divergence: NaN/inf, or the smoothed loss this many times its starting value to the end of the run
# and still within EXPLODED_NEAR_PEAK of its peak there: a loss that keeps growing. An lr-1e6 step
# threw a run to loss 3e24 and then onto a flat 6e4 (every ReLU dead under one huge logit): that is
# a plateau, not a divergence.
DIVERGE_FACTOR = 10.0
EXPLODED_NEAR_PEAK = 0.1
# Edge of stability: lr * lambda_max >= 2 (gradient descent on a quadratic with curvature lambda
# is stable only for lr < 2/lambda).
EOS_RATIO = 2.0
# Run-level: "learned" means the smoothed loss fell by this share of its start (0.35 nats from
# ln 10) -- or of the label entropy when it started higher; "never learned" means it never fell by
# more than 1 - NEVER_LEARNED_FRAC of it.
LEARNED_DROP_FRAC = 0.15
NEVER_LEARNED_FRAC = 0.95
# Unstable: the share of steps that overshoot (or the loss's relative jitter) above which a run is
# "jumping around" rather than descending.
UNSTABLE_OVERSHOOT_SHARE = 0.3
# Collapse verdict: after learning, the loss ends this far above its best (nats, and as a share of
# what had been learned): SGD noise around a converged level stays well inside both.
PLATEAU_RISE = 0.25
PLATEAU_RISE_FRAC = 0.3
# Overfitting: validation loss this far (relative) above its minimum while training loss kept falling.
OVERFIT_REL = 0.1
SMOOTH = 20          # steps in the moving average used for run-level levels
# ... and at least this many images: the noise of a mean loss falls with the images averaged, not the
# steps. 20 steps of 32 at the batch sizes the thresholds were measured at; at batch 2 the 20-step
# average swung between 0.21 and 1.46 within 70 steps of a run whose held-out accuracy moved by 2
# points (bench_diagnosis --seed 100, tinybatch-s2), which read as "learned, then worse".
SMOOTH_IMAGES = 640
START_STEPS = 5      # the run's starting loss is the mean over its first this many steps (one batch is noisy)
# Decisive step = onset. The step that threw a run off is found as the largest update (relative to
# the weights, max over layers) in the window where it happened; the ONSET is the first of the run
# of outsized steps that ends there: walking back from the largest, a step before it belongs to the
# same move when it moved the weights ONSET_FACTOR times the median update of the ONSET_WINDOW
# steps before the move, or ran at ONSET_FACTOR times their median lr. A one-step lr jump is its
# own onset (its update is ~lr_jump/lr times the usual: 180x for 0.05 -> 9.0), not the step after
# it, whose update on the jump's huge gradient is often larger still (5474% against ~100% measured
# for the lr-9 jump at step 150 of a conv8k5-conv16k3-fc32 run: the old rule named step 151).
# Healthy runs at a constant lr stay within 3x of their median update ratio step to step.
ONSET_FACTOR = 10.0
ONSET_WINDOW = 50
# A plateau needs the gradient reaching the first layer to have fallen below this share of its median
# before the onset: on the collapsed runs it fell to 0 (every ReLU dead) or below 1% of before; the
# narrow batch-2 run that kept learning noisily had 1.5 against 0.24 before -- risen, not fallen.
GRAD_FALLEN = 0.1
# A plateau (dead layers / constant prediction) "lasts to the end" when its episode ends within
# this many steps of the run's last step (episodes are merged across gaps of up to STATE_GAP
# steps, so the last few steps may fall outside the episode).
PLATEAU_END_SLACK = 5

# Episodes: flagged steps at most this many steps apart are one episode (one row in the event
# table). One-step excursions (a single healthy batch on a plateau) should not split an episode:
# 3 steps for the per-step loss events, 5 for the conditions that persist (dead layers, collapse,
# oscillation, stall); edge-of-stability measurements, taken every K steps, merge across 2K.
SPIKE_GAP = OVERSHOOT_GAP = 3
STATE_GAP = 5
# The event table (minicnn inspect, the figure's shading) merges nearby episodes of a kind until at
# most this many rows remain.
EVENT_ROWS = 24


# An update that moves a layer by this share of its norm is outsized whatever came before it (the
# onset walk-back needs a history of usual steps; at step 0 there is none). Healthy runs: the
# largest update ratio of any step of the explore runs at lr 0.05-0.1 was ~0.1 (first steps of a
# fresh network); the steps that killed a network moved a layer by 0.26-924x its norm.
OUTSIZED_UPDATE = 0.5

# ---------------------------------------------------------------- causes (minicnn.diagnose.causes)
# lr spike: the lr at the onset this many times the median lr of the 50 steps before. Schedules that
# users write change the lr by 0.1x (step decay) or smoothly (cosine, warmup: at most 2x per step
# from the second step of a warmup on); a 10x jump up within one step is an outsized lr.
LR_SPIKE_FACTOR = 10.0
# Un-normalised inputs: values beyond this magnitude. Images scaled to [0, 1] stay within 1;
# standardised MNIST / CIFAR-10 within 2.8 / 2.6; pixels left at 0-255 reach 255. (explain's case 2,
# softmax regression on pixels x 10, reaches 10; case 3's x 3 does not count.)
INPUT_ABS_MAX = 5.0
# An initialisation far too large: the first |logit| above this with normal inputs. PyTorch's
# default init gives first logits of 0.1-1 on the built-in data (small, tiny, mlp nets); x 30 gave
# thousands.
INIT_LOGIT_MAX = 20.0
# ... or, without logit statistics, a first loss this many times the label entropy.
FIRST_LOSS_FACTOR = 3.0
# Tiny batches: at most this many images, so one confidently wrong image makes the whole step
# (explain's case 3: batches of 2, a batch loss of 10-40 on the step that killed the ReLUs).
TINY_BATCH = 4
# High momentum: each gradient keeps acting for 1/(1-m) steps; at m >= 0.95 that is 20+ steps, so
# a learning rate tuned without momentum is 20x too large.
MOMENTUM_HIGH = 0.95
# Too much weight decay: lr x wd shrinks the weights by this share every step before the gradient
# acts (1%: halved in 70 steps) and the weight norm ended below WD_SHRINK of its start.
WD_STEP_DECAY = 0.01
WD_SHRINK = 0.5
# Learning rate too small: the median step moves the weights by less than this share of their norm
# (healthy runs at lr 0.05-0.1: 0.1-1% per step; lr 1e-4: ~0.0001%).
SLOW_UPDATE_RATIO = 1e-4
# Labels that do not follow the images: the best validation accuracy within this of chance while the
# training accuracy reached MEMORISED_TRAIN_ACC.
CHANCE_MARGIN = 0.05
MEMORISED_TRAIN_ACC = 0.5

# ---------------------------------------------------------------- instruments (--noise-every, --sharpness layers)
# Batch size << B_noise: the steps are mostly noise. B_noise = tr(Sigma) / |g|^2 (McCandlish et al.
# 2018, "An Empirical Model of Large-Batch Training") is the batch size at which the batch
# gradient's noise variance tr(Sigma) / B equals its squared signal |g|^2. At B_noise >= 4 B the
# noise is >= 2x the signal in norm and the batch gradient's cosine with the true gradient is at most
# 1 / sqrt(1 + 4) = 0.45: each step mostly follows the batch's own images. Measured (narrow conv4-conv8
# net, inputs x 3, shapes data): the batch-2 and batch-6 runs that collapsed had B_noise 10-30x their
# batch in the 500 steps before the onset; healthy runs at batch 32 had 1-3x (small and mlp nets,
# first quarter). But healthy runs get there too as the gradient shrinks late in training (7-30x at
# batches 6-8 after 2,000 steps), so this is a cause for a bad verdict, never a verdict of its own.
NOISE_BATCH_FACTOR = 4.0
# B_noise is the ratio of two noisy estimates: it is averaged as McCandlish et al. do (numerator and
# denominator separately) over the measurements in the NOISE_WINDOW steps up to the onset (from
# the start: the first NOISE_WINDOW steps), at least NOISE_MIN_MEASUREMENTS of them (with
# --noise-every 10, 50 steps; an onset at step 2 has one measurement, at init, whose sign alone
# is noise: the small net at batch 32 read B_noise -93 there).
NOISE_WINDOW = 500
NOISE_MIN_MEASUREMENTS = 5
