{{/* Names and labels shared by every template. */}}
{{- define "meshlet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meshlet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "meshlet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The injected sidecar's image: the chart's own unless proxy.image names another. */}}
{{- define "meshlet.proxyImage" -}}
{{ .Values.proxy.image | default (include "meshlet.image" .) }}
{{- end -}}

{{/* The agent's: the same image's -agent variant (Containerfile.agent) unless agent.image names one. */}}
{{- define "meshlet.agentImage" -}}
{{ .Values.agent.image | default (printf "%s-agent" (include "meshlet.image" .)) }}
{{- end -}}

{{- define "meshlet.webhookName" -}}
{{ include "meshlet.fullname" . }}-webhook
{{- end -}}

{{/* The container hardening every meshlet-owned non-privileged container gets. */}}
{{- define "meshlet.restricted" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "meshlet.identityName" -}}
{{ include "meshlet.fullname" . }}-identity
{{- end -}}

{{/* The Secret holding the mesh CA dir: the user's, or the one the chart creates once. */}}
{{- define "meshlet.caSecretName" -}}
{{ .Values.meshCA.existingSecret | default (printf "%s-mesh-ca" (include "meshlet.fullname" .)) }}
{{- end -}}
