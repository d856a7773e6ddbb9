process ENCODE {
    tag "${meta.id}"
    label 'process_gpu'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.accelerator ? task.ext.container_gpu : task.ext.container_cpu }"

    input:
    tuple val(meta), path(vae), path(tokens)

    output:
    tuple val(meta), path('latents.npz'), path('latents.json'), emit: latents
    tuple val(meta), path('reconstruction.json')              , emit: reconstruction
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args   = task.ext.args ?: ''
    def device = task.accelerator ? 'cuda' : 'cpu'
    """
    sclatent encode \\
        --model ${vae} \\
        --tokens ${tokens} \\
        --outdir . \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${args}
    """

    stub:
    """
    touch latents.npz
    echo '{}' > latents.json
    echo '{}' > reconstruction.json
    """
}
