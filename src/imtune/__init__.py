"""imtune: instruction tuning with exactly controlled per-token loss weights (IT, IM and everything between).

The flow, one stage package after another (docs/design.md has the tree), frozen dataclasses between them
(imtune.types), `imtune train` top to bottom:

    stage        function                                        gives
    read         data.records.read_records / stream_records      (Where, record)  one reader for every JSON/JSONL input
    understand   data.formats.to_conversation                    Conversation     (messages, alpaca, sharegpt, ...;
                                                                                  data.validate words the errors)
    render       data.templates.Renderer.render                  Rendered         text + role/turn spans
    tokenize     data.tokenize.encode                            Encoded          ids + character offsets
    weigh        data.weights.weigh (LOSS_MODES: class -> w)     Examples         flat int32 ids, float64 weights
    (all of it)  data.prepare.prepare_examples (+ data.cache)    Prepared         the one data entry; cached on disk
    batch        data.pack.make_batches + collate                Batch            padded or packed rows
    forward      model.forward.hidden_states                     hidden states    the one forward (train and eval)
    loss         model.objective.Objective -> model.loss.weighted_nll   LossSums  Σ w·nll and Σ w; train normalises
    steps        train.plan.schedule                             Schedule         steps per epoch and in all
    train        train.loop.setup -> train.loop.fit              Run -> RUN/      frozen Run; train.build makes objects
      track      train.track.evaluate (step 0: train.baseline)   metrics.jsonl    eval lines, --keep-best -> best/
      save       train.saving.save_checkpoint / save_final       checkpoints/, final/, DONE
    read a run   rundir.read.read_run                            RunDir
    evaluate     evaluate.run.evaluate_run                       RunEval          re-reads the data as training did
    compare      experiments.compare.compare (experiments.jobs)  compare.json     arms x seeds, analysis.evidence
    report       report.write.write_report                       report.md/html

Instruction Modelling (Shi et al., NeurIPS 2024) puts loss on instruction tokens as well as outputs; template tokens
(role tags) never carry loss. Loss modes are class -> weight tables (imtune.data.weights.LOSS_MODES).
"""
__version__ = "0.1.0"
