"""Exceptions raised by dwdp_ops. Every failure the library can diagnose becomes one of these, with a message that
names what was wrong and what was expected."""


class DwdpError(RuntimeError):
    """A runtime failure: no GPU, a lifecycle misuse, a collective that ranks disagree on, a native error."""


class RendezvousError(DwdpError):
    """The TCP control plane failed: a rank never arrived, died, or disagreed with rank 0. The message names the
    ranks concerned."""


class CoActionArgumentError(TypeError, ValueError):
    """An array given to a fused co-action op (``coaction_forward_gpu``, ``coaction_backward_gpu``, ``TableGrads``,
    the autograd op ``coaction``) has the wrong shape, or is refused by a check of its shape together with its dtype
    and layout (one message names all three). Both a TypeError and a ValueError, so that ``except ValueError`` (as
    around the reference, whose shape errors are ValueErrors) and ``except TypeError`` (what the combined checks of
    the fused ops raised before) both catch it; the checks of a dtype alone stay TypeErrors and those of a value
    alone (an id, a device) ValueErrors."""
