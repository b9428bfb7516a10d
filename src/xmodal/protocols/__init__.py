"""Official evaluation protocols shared by methods and evaluators: ``cir`` (FashionIQ, CIRR) for
every composed image retrieval method; ``retrieval`` (image<->text recall, the embedding-cache key
of a split) for the evaluators and the methods trained on cached embeddings; ``uclip`` (uCLIP's
posterior-sample ranking, confidences and calibration plots) for ``evaluator=uclip`` and
``method=probvlm``. Nothing is imported here: ``from xmodal.protocols.cir import ...``."""
