"""xlsub: language-specific head subnetworks in multilingual masked language models."""

__version__ = "0.1.0"
