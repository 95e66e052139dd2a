"""The numbers behind each verdict, in one place so they can be documented and tuned.

Distances between statistics are in standardized units: a mean shift of 0.5 means the
probe batch's channel mean sits half a running standard deviation away from the running
mean. Measured on the question's MNIST MLP (batch 1000, Adam lr 0.01, 60 steps): with one BN
per layer the average shift is about 0.1 and the variance ratio within [0.9, 1.1]; the
shared BN's call sites sit about 0.4 SD off and differ from each other by far more.
"""

# Check 2: running statistics that don't describe the activations.
MEAN_SHIFT_WARN = 0.5  # average over channels of |mu_batch - mu_run| / sqrt(var_run + eps)
VAR_RATIO_LOW = 0.5  # geometric mean over channels of var_batch / var_run ...
VAR_RATIO_HIGH = 2.0  # ... outside [LOW, HIGH] is a warning
# Below this many values per channel the batch statistics are too noisy to judge the
# running statistics (the standard error of a mean is 1/sqrt(n) SD: 0.18 SD at n=32).
MIN_VALUES_FOR_STATS = 32

# Check 1: when the call sites of a shared BN see the same distribution (a siamese
# branch, say), one set of running statistics can describe all of them; only then is
# sharing downgraded from an error to a warning. Same units as above, between sites.
SITES_ALIKE_MEAN = 0.25
SITES_ALIKE_VAR_RATIO = 1.25

# Check 3: share of probe samples whose predicted class differs between modes.
DIVERGENCE_WARN = 0.10
# Below this share of the way from their initial values, running statistics are still
# warming up (an exponential average after few updates): stale-stats reports info, and
# train-eval-divergence names it as the cause.
WARMED_UP = 0.95

# Check 5: a PyTorch momentum above this is almost surely another framework's decay.
MOMENTUM_SUSPECT = 0.5

# Check 6: values per channel in one train-mode BN call.
SMALL_BATCH_WARN = 8

# Check 7: per-device samples below which DataParallel + plain BN deserves SyncBatchNorm.
PER_DEVICE_BATCH_INFO = 32

# DDP: running statistics of one layer differ across ranks when, as the last synchronising
# training pass began, some value differed by more than this share of the layer's largest
# value (DDP's broadcast and SyncBatchNorm leave them bit-identical; the margin is for
# float noise only).
RANK_STATS_REL_TOL = 1e-5
