"""The method protocol: how any concept is applied to a pipeline and removed again.

Strength has one meaning for the user across methods: 0 = the concept is off (the output equals
the base for that prompt, with the trigger read as the class word), 1 = as trained, monotonic in
between, up to ~1.5. Each method documents its mapping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from studio.concept import Concept
    from studio.models import BaseModel

class Applied(Protocol):
    """A concept applied to a pipeline."""

    concept: Concept

    def prompt_text(self) -> str:
        """What the trigger token is rewritten to in the prompt (method tokens, or the class word)."""
        ...

    def remove(self) -> None:
        """Undo :meth:`Method.apply`: the pipeline is bit-for-bit the base again."""
        ...

class Method(Protocol):
    """One personalization method (textual inversion, LoRA, Perfusion, NeTI, zero-shot …)."""

    name: ClassVar[str]
    description: ClassVar[str]
    # True when the trigger alone names the subject, as the method trains it ("a photo of <tok>":
    # textual inversion, NeTI, Perfusion); False when it is an identifier that goes with the class
    # noun ("a photo of sks dog": DreamBooth). Evaluation prompts name the concept accordingly.
    trigger_is_subject: ClassVar[bool]
    # Readers of other tools' files: ``(tensors, metadata, path) -> Concept | None`` (None: not mine),
    # tried in registry order by ``concepts import``; and writers by format name (``concepts export``).
    importers: ClassVar[tuple[Any, ...]]
    exporters: ClassVar[dict[str, Any]]
    # What the method's files may hold (:class:`studio.safetensors_io.Limits`: dtype allow-list, total
    # tensor bytes), checked from the header before anything is allocated; and the largest |value| a
    # valid concept holds (``validate`` refuses more, and NaN/inf).
    file_limits: ClassVar[Any]
    max_abs: ClassVar[float]

    def validate(self, concept: Concept) -> None:
        """Check the concept's tensors (names, ranks, dtypes in ``file_limits``, finite, ``|x| ≤ max_abs``);
        raise ConceptFormatError."""
        ...

    def check_base(self, concept: Concept, base: BaseModel) -> None:
        """Check tensor sizes against the loaded base; raise IncompatibleConceptError."""
        ...

    def apply(self, base: BaseModel, concept: Concept, *, strength: float) -> Applied:
        """Apply ``concept`` to ``base.pipe`` at ``strength``."""
        ...

def class_word_text(concept: Concept) -> str:
    """The text that stands for a concept that is off (strength 0)."""
    return concept.class_word or ""

def plain_prompt_text(concept: Concept, strength: float) -> str:
    """For methods whose trigger is ordinary text (LoRA identifiers): the trigger and the class word."""
    if strength == 0:
        return class_word_text(concept)
    return " ".join(t for t in (concept.trigger.strip("<>"), concept.class_word) if t)

