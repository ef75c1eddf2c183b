"""The toy models' lab: training (:mod:`.training`, architectures in :mod:`.models`), export and
import of the shipped weights (:mod:`.export`), their evaluation (:mod:`.evaluate`,
:mod:`.p2p_quality`) and the verify table of every method (:mod:`.verify`). It stands on the whole
library; nothing imports it."""
