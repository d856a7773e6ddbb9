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
    def args    = task.ext.args ?: ''
    def device  = task.accelerator ? 'cuda' : 'cpu'
    // more than one GPU: torchrun starts one DDP process per GPU, each running the same `sclatent` command
    // (--batch-size stays the global batch); --standalone takes a free port, so tasks on one node never collide
    def n_gpus  = task.accelerator ? (task.accelerator.request ?: 1) as int : 0
    def launch  = n_gpus > 1 ? "torchrun --standalone --nproc_per_node ${n_gpus} --no-python sclatent" : 'sclatent'
    def threads = n_gpus > 1 ? Math.max(1, task.cpus.intdiv(n_gpus)) : task.cpus
    """
    ${launch} train-prior \\
        --latents ${latents} \\
        --outdir prior \\
        --device ${device} \\
        --threads ${threads} \\
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
