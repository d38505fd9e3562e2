"""Teacher licences: the one place that says what each licence lets a distilled student do.

A catalog entry names its licence by key (``TeacherSpec.license``); whether a student trained on that
teacher's outputs inherits a non-commercial restriction (``TeacherSpec.noncommercial_derivatives``), the
README's teacher table and the exported model card's licence table and paragraph are all derived from
the :class:`Licence` below. Licence strings that are not keys here (generic sources, a user's own entry)
are treated as unknown: the card then asks the user to check them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Licence:
    """What a teacher's licence and model-card terms allow.

    Attributes:
        key: The licence as the catalog writes it (``TeacherSpec.license``).
        noncommercial: The licence bars commercial use (CC-BY-NC*, Owkin, Kaiko non-commercial).
        no_derivatives: The licence bars sharing adapted material (CC-BY-*-ND).
        derivatives_clause: The terms say models trained on the teacher's outputs may not be used commercially.
        hf_license: Hugging Face card ``license:`` identifier (``other`` when there is none).
        url: Where the licence text is.
        note: Extra terms worth repeating on a student's card (intended use, requests).
        verified: Whether the licence was read from the model card or repository (False: conservative guess).
    """

    key: str
    noncommercial: bool
    no_derivatives: bool = False
    derivatives_clause: bool = False
    hf_license: str = "other"
    url: str | None = None
    note: str = ""
    verified: bool = True

    @property
    def restricts_student(self) -> bool:
        """Whether a student distilled from this teacher may not be used commercially."""
        return self.noncommercial or self.no_derivatives or self.derivatives_clause

    @property
    def reason(self) -> str:
        """Why a student inherits a restriction, in words (empty when it does not)."""
        parts = []
        if self.noncommercial:
            parts.append("non-commercial licence")
        if self.no_derivatives:
            parts.append("no-derivatives licence")
        if self.derivatives_clause:
            parts.append("its terms bar commercial use of models trained on its outputs")
        return "; ".join(parts)


CC_BY_NC_ND = "CC-BY-NC-ND-4.0"
APACHE = "Apache-2.0"

LICENCES: dict[str, Licence] = {
    lic.key: lic
    for lic in (
        Licence(
            CC_BY_NC_ND,
            noncommercial=True,
            no_derivatives=True,
            derivatives_clause=True,
            hf_license="cc-by-nc-nd-4.0",
            url="https://creativecommons.org/licenses/by-nc-nd/4.0/",
        ),
        Licence(
            APACHE, noncommercial=False, hf_license="apache-2.0", url="https://www.apache.org/licenses/LICENSE-2.0"
        ),
        Licence(
            "Apache-2.0 with additional terms",
            noncommercial=False,
            hf_license="apache-2.0",
            url="https://huggingface.co/paige-ai/Virchow",
            note="the card adds requests (attribution, responsible use) and gated access, not a commercial bar",
        ),
        Licence(
            "Apache-2.0 (research use)",
            noncommercial=False,
            hf_license="apache-2.0",
            url="https://github.com/prov-gigapath/prov-gigapath",
            note="the README says the checkpoints are intended for research use only; any deployed use is out of scope",
        ),
        Licence(
            "Owkin non-commercial",
            noncommercial=True,
            url="https://github.com/owkin/HistoSSLscaling/blob/main/LICENSE.txt",
        ),
        Licence(
            "Kaiko non-commercial",
            noncommercial=True,
            url="https://github.com/kaiko-ai/towards_large_pathology_fms/blob/main/LICENSE",
        ),
        Licence(
            "Bioptimus academic-research terms",
            noncommercial=True,
            url="https://huggingface.co/bioptimus/H-optimus-1",
            note="gated; Bioptimus announces access 'for academic research purposes'",
            verified=False,
        ),
    )
}


def licence_terms(key: str) -> Licence | None:
    """The :class:`Licence` for a catalog licence key, or None when the licence is not known."""
    return LICENCES.get(key)
