"""Official evaluation protocols shared by methods: ``cir`` (FashionIQ, CIRR) for every composed
image retrieval method. Nothing is imported here: ``from xmodal.protocols.cir import ...``."""
