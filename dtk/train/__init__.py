"""The one training engine every training command uses (see ``dtk.train.engine``)."""
