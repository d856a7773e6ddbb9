process TOKENIZE {
    tag "${meta.id}"
    label 'process_low'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.ext.container_cpu }"

    input:
    tuple val(meta), path(train), path(test)
    // a model bundle to tokenize over its vocabulary and labels (running a trained model), or [] for none
    path(model)

    output:
    tuple val(meta), path('tokens'), emit: tokens
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args      = task.ext.args ?: ''
    def model_arg = model ? "--model ${model}" : ''
    """
    sclatent tokenize \\
        --train ${train} \\
        --test ${test} \\
        --outdir tokens \\
        --no-progress \\
        ${model_arg} \\
        ${args}
    """

    stub:
    """
    mkdir -p tokens/train tokens/test
    echo '{"splits": {"train": {"n_cells": 1}, "test": {"n_cells": 1}}}' > tokens/manifest.json
    """
}
