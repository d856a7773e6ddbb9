process TRAIN_PRIOR {
    tag "${meta.id}"
    label 'process_gpu'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.accelerator ? task.ext.container_gpu : task.ext.container_cpu }"

    input:
    tuple val(meta), path(latents), path(latents_json)

    output:
    tuple val(meta), path('prior')              , emit: prior
    tuple val(meta), path('prior/history.csv')  , emit: history
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args   = task.ext.args ?: ''
    def device = task.accelerator ? 'cuda' : 'cpu'
    """
    sclatent train-prior \\
        --latents ${latents} \\
        --outdir prior \\
        --device ${device} \\
        --threads ${task.cpus} \\
        --no-progress \\
        ${args}
    """

    stub:
    """
    mkdir -p prior
    touch prior/checkpoint.pt prior/config.json
    echo 'step,epoch,loss' > prior/history.csv
    """
}
