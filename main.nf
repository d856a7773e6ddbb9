#!/usr/bin/env nextflow
/*
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    sclatent: scalable latent diffusion (scLDM) for single-cell gene expression
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    nextflow run main.nf -profile test
    nextflow run main.nf -profile slurm,gpu --input samplesheet.csv --outdir results
----------------------------------------------------------------------------------------------------------------
*/

include { CHECK_SAMPLESHEET                     } from './modules/local/check_samplesheet'
include { PREPARE                               } from './modules/local/prepare'
include { TOKENIZE                              } from './modules/local/tokenize'
include { PIPELINE_INITIALISATION               } from './subworkflows/local/utils_sclatent'
include { PIPELINE_COMPLETION                   } from './subworkflows/local/utils_sclatent'

/*
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    THE PIPELINE: samplesheet -> per dataset: PREPARE -> TOKENIZE
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
*/

workflow SCLATENT {
    take:
    ch_samplesheet    // channel: path(samplesheet.csv)
    base_dir          // value: folder relative h5ad paths are resolved against

    main:
    //
    // MODULE: validate the samplesheet (JSON schema, Python side); one row per file, paths made absolute
    //
    CHECK_SAMPLESHEET(ch_samplesheet, base_dir)

    // [ meta(id, condition_keys), [h5ad, ...], [split, ...], [batch, ...] ], one item per dataset
    ch_datasets = CHECK_SAMPLESHEET.out.csv
        .splitCsv(header: true)
        .map { row ->
            def meta = [id: row.dataset, condition_keys: row.condition_keys ?: '']
            [meta, file(row.h5ad, checkIfExists: true), row.split ?: 'all', row.batch ?: '']
        }
        .groupTuple()

    //
    // MODULE: combine + QC + split + HVG flags, per dataset
    //
    PREPARE(ch_datasets)

    //
    // MODULE: sparse tokens over a fixed vocabulary
    //
    TOKENIZE(PREPARE.out.h5ad)

    emit:
    prepare_json = PREPARE.out.json       // channel: [ meta, prepare.json ]
    tokens       = TOKENIZE.out.tokens    // channel: [ meta, tokens/ ]
}

/*
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    ENTRY WORKFLOW
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
*/

workflow {
    main:
    PIPELINE_INITIALISATION()

    SCLATENT(
        PIPELINE_INITIALISATION.out.samplesheet,
        PIPELINE_INITIALISATION.out.base_dir,
    )

    PIPELINE_COMPLETION()
}
