"""The image-text matcher: a small contrastive model that scores how well a picture fits a text, used to rerank
text->image candidates (the ``matcher`` scorer of ``anyloom.generation.scorers``). The model and its head contract
are in :mod:`anyloom.matcher.model`; its trainer is ``anyloom.training.matcher``."""
