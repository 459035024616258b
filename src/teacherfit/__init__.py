"""teacherfit: choose the teacher that fits your student, then distill it.

Layers (imports go downwards only): cli -> pipelines -> methods (metrics, losses) ->
backends (models, generation, rewards, scoring) -> data (records, formats, store).
"""

__version__ = "0.1.0"
