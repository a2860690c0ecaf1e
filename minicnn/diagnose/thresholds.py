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
# Dead layer: a ReLU layer with this share of its units zero for every sample of the batch passes
# (almost) no gradient to the layers below.
DEAD_LAYER = 0.9
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
# Divergence: NaN/inf, or the smoothed loss this many times its starting value.
DIVERGE_FACTOR = 10.0
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
START_STEPS = 5      # the run's starting loss is the mean over its first this many steps (one batch is noisy)
# Collapse's decisive step: steps just before the largest update that moved the weights at least this
# share as much belong to the same outsized move; the first of them is named.
CHAIN_FRAC = 0.5
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


