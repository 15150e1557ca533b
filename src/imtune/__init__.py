"""imtune: instruction tuning with exactly controlled per-token loss weights (IT, IM and everything between).

The flow, one stage a module, plain frozen dataclasses between them (imtune.types):

    load ─▶ formats ─▶ validate ─▶ templates ─▶ tokenize ─▶ weights ─▶ pack ─▶ loss ─▶ train ─▶ evaluate ─▶ compare/report
    (file)  (Conversation)          (Rendered: text + spans)  (Encoded)  (Examples)  (Batch)          (run dir)

Instruction Modelling (Shi et al., NeurIPS 2024) puts loss on instruction tokens as well as outputs; template tokens
(role tags) never carry loss. Loss modes are class -> weight tables (imtune.weights.LOSS_MODES).
"""
__version__ = "0.1.0"
