"""User verbs built on the models and the training engine: pretrain, annotate, integrate, perturb, grn,
multi-omic integration."""
