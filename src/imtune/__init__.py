"""imtune: instruction tuning with exactly controlled per-token loss weights (IT, IM and everything between).

The flow, one stage a module, frozen dataclasses between them (imtune.types), `imtune train` top to bottom:

    stage           function                                   gives
    read            load.read_records / load.stream_records    (Where, record)  one reader for every JSON/JSONL input
    understand      formats.to_conversation                    Conversation     (messages, alpaca, sharegpt, ...;
                                                                                 validate only words the errors)
    render          templates.Renderer.render                  Rendered         text + role/turn spans
    tokenize        tokenize.encode                            Encoded          ids + character offsets
    weigh           weights.weigh (LOSS_MODES: class -> w)     Examples         flat int32 ids, float64 weights
    (all of it)     prepare.prepare_examples (+ cache)         Prepared         the one data entry; cached on disk
    batch           pack.make_batches + pack.collate           Batch            padded or packed rows
    forward         forward.hidden_states                      hidden states    the one forward (train and eval)
    loss            objective.Objective -> loss.weighted_nll   LossSums         Σ w·nll and Σ w; train normalises
    steps           plan.schedule                              Schedule         steps per epoch and in all (compare too)
    train           train.setup -> train.fit                   Run -> RUN/      frozen Run; build.* make its objects
      track         track.evaluate (step 0: baseline)          metrics.jsonl    eval lines, --keep-best -> best/
      save          saving.save_checkpoint / save_final        checkpoints/, final/, DONE
    read a run      rundir.read_run                            RunDir
    evaluate        evaluate.run.evaluate_run                  RunEval          re-reads the data as training did
    compare         compare.compare (schedule.train_all)       compare.json     arms x seeds, evidence.* intervals
    report          report.write_report                        report.md/html

Instruction Modelling (Shi et al., NeurIPS 2024) puts loss on instruction tokens as well as outputs; template tokens
(role tags) never carry loss. Loss modes are class -> weight tables (imtune.weights.LOSS_MODES).
"""
__version__ = "0.1.0"
