#!/usr/bin/env nextflow
/*
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    sclatent: scalable latent diffusion (scLDM) for single-cell gene expression
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    nextflow run main.nf -profile test
    nextflow run main.nf -profile slurm,gpu --input samplesheet.csv --outdir results
    nextflow run main.nf --input new.csv --model results/pbmc/model/model.pt --outdir applied   (no training)
----------------------------------------------------------------------------------------------------------------
*/

include { CHECK_SAMPLESHEET                     } from './modules/local/check_samplesheet'
include { PREPARE                               } from './modules/local/prepare'
include { TOKENIZE                              } from './modules/local/tokenize'
include { TRAIN_VAE                             } from './modules/local/train_vae'
include { ENCODE                                } from './modules/local/encode'
include { TRAIN_PRIOR                           } from './modules/local/train_prior'
include { BUNDLE                                } from './modules/local/bundle'
include { EMBED                                 } from './modules/local/embed'
include { SAMPLE                                } from './modules/local/sample'
include { GATHER                                } from './modules/local/gather'
include { TRANSFER                              } from './modules/local/transfer'
include { EVALUATE                              } from './modules/local/evaluate'
include { REPORT                                } from './modules/local/report'
include { PIPELINE_INITIALISATION               } from './subworkflows/local/utils_sclatent'
include { PIPELINE_COMPLETION                   } from './subworkflows/local/utils_sclatent'

/*
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    THE PIPELINE: samplesheet -> per dataset: PREPARE -> TOKENIZE -> TRAIN_VAE -> ENCODE -> TRAIN_PRIOR
                  -> BUNDLE -> SAMPLE (scattered: replicates x shards) -> GATHER -> EVALUATE -> REPORT,
                  EMBED of every input file (obsm['X_sclatent']), and TRANSFER of the test cells (--transfer).
                  With a trained model (--model): PREPARE -> TOKENIZE over the model's vocabulary -> ENCODE,
                  then SAMPLE ... REPORT, EMBED and TRANSFER with that model; no training.
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
*/

workflow SCLATENT {
    take:
    ch_samplesheet       // channel: path(samplesheet.csv)
    base_dir             // value: folder relative h5ad paths are resolved against
    model                // value: null (train a model on each dataset) or the path of a model bundle to run
    sample_conditions    // value: null (like the test cells) or 'k=v,k2=v2;k=v3'
    sample_n_cells       // value: cells per requested condition
    sample_replicates    // value: generated replicates
    sample_shard_size    // value: cells per SAMPLE task
    sample_batch_size    // value: cells per sampling batch
    transfer             // value: null, or the labels to carry the test cells to ('k=v,k2=v2')
    trace_file           // value: path of the run's Nextflow execution trace, or null

    main:
    //
    // MODULE: validate the samplesheet (JSON schema, Python side); one row per file, paths made absolute
    //
    CHECK_SAMPLESHEET(ch_samplesheet, base_dir)

    // [ meta(id, condition_keys), h5ad, [h5ad, split, batch] ], one item per file
    ch_files = CHECK_SAMPLESHEET.out.csv
        .splitCsv(header: true)
        .map { row ->
            def meta = [id: row.dataset, condition_keys: row.condition_keys ?: '']
            [meta, file(row.h5ad, checkIfExists: true), [h5ad: row.h5ad, split: row.split ?: 'all', batch: row.batch ?: '']]
        }
    // [ meta, [h5ad, ...], [[h5ad, split, batch], ...] ], one item per dataset
    ch_datasets = ch_files.groupTuple()

    //
    // MODULE: combine + QC + split + HVG flags, per dataset
    //
    PREPARE(ch_datasets)
    // the console names the combinations kept out of training (the task log is not enough)
    PREPARE.out.json.subscribe { meta, json ->
        def held = new groovy.json.JsonSlurper().parseText(json.text).holdout
        if (held) {
            log.warn("${meta.id}: held out of training (test cells only): ${held.combinations.join('; ')} (${held.test_cells} cells)")
        }
    }

    if (model) {
        //
        // A trained model on new data: tokens over its vocabulary (missing genes absent), latents, no training
        //
        def bundle = file(model, checkIfExists: true)
        ch_model = PREPARE.out.h5ad.map { meta, _train, _test -> [meta, bundle] }
        TOKENIZE(PREPARE.out.h5ad, bundle)
        ENCODE(ch_model.join(TOKENIZE.out.tokens))
        ch_vae   = PREPARE.out.h5ad.map { meta, _train, _test -> [meta, []] }   // no training histories
        ch_prior = ch_vae
    } else {
        //
        // MODULES: sparse tokens over the data's vocabulary, stage 1 (VAE), latents, stage 2 (DiT prior)
        //
        TOKENIZE(PREPARE.out.h5ad, [])
        TRAIN_VAE(TOKENIZE.out.tokens)
        ENCODE(TRAIN_VAE.out.vae.join(TOKENIZE.out.tokens))
        TRAIN_PRIOR(ENCODE.out.latents)
        //
        // MODULE: the model bundle (weights, vocabularies, versions) that SAMPLE and the Python API load
        //
        BUNDLE(TRAIN_VAE.out.vae.join(TRAIN_PRIOR.out.prior))
        ch_model = BUNDLE.out.model
        ch_vae   = TRAIN_VAE.out.vae
        ch_prior = TRAIN_PRIOR.out.prior
    }

    //
    // MODULE: every input file with the model's embedding in obsm['X_sclatent'] (names made unique per dataset)
    //
    ch_embed_in = ch_files
        .map { meta, h5ad, _row -> [meta, h5ad] }
        .groupTuple()
        .flatMap { meta, files ->
            def clash = files*.name.unique().size() < files.size()
            files.withIndex().collect { f, i -> [meta, f, clash ? "${i + 1}_${f.name}" : f.name] }
        }
        .combine(ch_model, by: 0)
        .map { meta, h5ad, name, model_pt -> [meta + [embed_name: name], h5ad, model_pt] }
    EMBED(ch_embed_in)

    //
    // MODULE: SAMPLE scattered into shards x replicates, gathered per dataset
    //
    // [ meta, request, n_cells ] per dataset: one cell per test cell (default), or the requested conditions
    ch_requests = TOKENIZE.out.tokens.map { meta, tokens ->
        def manifest = new groovy.json.JsonSlurper().parseText(tokens.resolve('manifest.json').text)
        sample_conditions
            ? [meta, [like: false, n_cells: sample_n_cells, conditions: sample_conditions], sample_n_cells * sample_conditions.tokenize(';').size()]
            : [meta, [like: true], (manifest.splits?.test?.n_cells ?: 0) as int]
    }
    ch_requests.filter { _meta, _request, n -> n == 0 }.subscribe { meta, _request, _n ->
        log.warn("${meta.id}: no test cells to generate like (test split empty); set --sample_conditions to generate anyway")
    }
    // shard boundaries on multiples of the sampling batch size, so that sharding never changes a cell
    def shard = Math.max(1, Math.ceil(sample_shard_size / sample_batch_size) as int) * sample_batch_size
    ch_shards = ch_requests.flatMap { meta, request, n ->
        def starts = (0..<((n + shard - 1).intdiv(shard))).collect { i -> i * shard }
        (0..<sample_replicates).collectMany { r -> starts.collect { a -> [meta, request, r, a, Math.min(a + shard, n)] } }
    }
    ch_sample_in = ch_model
        .join(PREPARE.out.h5ad.map { meta, _train, test -> [meta, test] })
        .combine(ch_shards, by: 0)
    SAMPLE(ch_sample_in)
    GATHER(SAMPLE.out.h5ad.groupTuple())

    //
    // MODULE: counterfactual transfer of the test cells to other labels (with --transfer)
    //
    ch_transferred = channel.empty()
    if (transfer) {
        TRANSFER(ch_model.join(PREPARE.out.h5ad.map { meta, _train, test -> [meta, test] }))
        ch_transferred = TRANSFER.out.h5ad
    }

    //
    // MODULE: metrics of the generated cells against the real test cells
    //
    EVALUATE(
        PREPARE.out.h5ad.map { meta, _train, test -> [meta, test] }
            .join(GATHER.out.h5ad)
            .join(ENCODE.out.reconstruction)
    )
    // combinations never seen in training: their scores on the console, not only in a task log
    EVALUATE.out.json.subscribe { meta, json ->
        def held = new groovy.json.JsonSlurper().parseText(json.text).held_out
        held?.per_combination?.each { combo, e ->
            def near = e.nearest.findAll { _k, n -> n?.real }.collect { _k, n -> "${n.combination} ${String.format('%.3g', n.real.w2 as double)}" }
            log.warn("${meta.id}: ${combo} was never seen in training: W2 ${String.format('%.3g', e.model.w2 as double)} " +
                "(real-vs-real floor ${String.format('%.3g', e.floor.w2 as double)}; nearest seen real cells: ${near.join(', ') ?: 'none'}); see the report's 'Held out' section")
        }
    }

    //
    // MODULE: one self-contained HTML report per dataset; its inputs joined by dataset, then split by role
    //
    ch_report = PREPARE.out.json
        .join(TOKENIZE.out.tokens)
        .join(ch_vae)
        .join(ch_prior)
        .join(ENCODE.out.reconstruction)
        .join(EVALUATE.out.json)
        .join(PREPARE.out.h5ad.map { meta, _train, test -> [meta, test] })
        .join(GATHER.out.h5ad)
        .map { row ->
            // the trace as written so far (every step of this dataset is done); [] where there is none to read yet
            // (e.g. a remote --outdir, written at the end)
            row + [trace_file != null && trace_file.exists() ? trace_file : []]
        }
        .multiMap { meta, prepare_json, tokens, vae, prior, reconstruction, metrics, test, generated, trace ->
            data:    [meta, prepare_json, tokens]
            models:  [meta, vae, prior, reconstruction]
            cells:   [meta, metrics, test, generated]
            context: [meta, trace, [], []]   // no baselines inside the pipeline (make bench adds them)
        }
    REPORT(ch_report.data, ch_report.models, ch_report.cells, ch_report.context)

    emit:
    report       = REPORT.out.html        // channel: [ meta, report.html ]
    prepare_json = PREPARE.out.json       // channel: [ meta, prepare.json ]
    tokens       = TOKENIZE.out.tokens    // channel: [ meta, tokens/ ]
    vae          = ch_vae                 // channel: [ meta, vae/ ] ([ meta, [] ] with --model)
    prior        = ch_prior               // channel: [ meta, prior/ ] ([ meta, [] ] with --model)
    model        = ch_model               // channel: [ meta, model.pt ]
    embedded     = EMBED.out.h5ad         // channel: [ meta, <input>.h5ad with obsm['X_sclatent'] ]
    generated    = GATHER.out.h5ad        // channel: [ meta, generated.h5ad ]
    metrics      = EVALUATE.out.json      // channel: [ meta, metrics.json ]
    transferred  = ch_transferred         // channel: [ meta, transferred.h5ad ] (with --transfer)
}

/*
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    ENTRY WORKFLOW
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
*/

workflow {
    main:
    PIPELINE_INITIALISATION()

    // the run's execution trace, from which REPORT reads the wall times (null when the trace is off)
    def trace = workflow.session.config.trace
    def trace_file = trace?.enabled && trace?.file ? file(trace.file.toString()) : null

    SCLATENT(
        PIPELINE_INITIALISATION.out.samplesheet,
        PIPELINE_INITIALISATION.out.base_dir,
        params.model,
        params.sample_conditions,
        params.sample_n_cells,
        params.sample_replicates,
        params.sample_shard_size,
        params.sample_batch_size,
        params.transfer,
        trace_file,
    )

    PIPELINE_COMPLETION()
}
