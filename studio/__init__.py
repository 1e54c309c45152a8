"""The personalization studio: base models, concepts, methods, generation, training, metrics.

Import what you need from the submodules, e.g.::

    from studio.models import BaseSettings
    from studio.service import Studio
    from studio.generation import GenerateConfig
"""

__version__ = "0.1.0"
